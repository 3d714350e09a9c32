"""Which slots this machine offers (the local discovery): GPUs found by NVML, or CPU slots.

``--slots auto`` asks NVML; where NVML finds no GPU (no driver, no library)
the server falls back to CPU slots and says so in one log line. ``cpu:N``
asks for N CPU slots; ``0,1`` for those GPU indices. CUDA is never
initialised in the server process: only NVML is used here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from remote_gpu_core.ids import SlotId

from .slots import Slot, cuda_visible_devices

__all__ = ["DEFAULT_CPU_SLOTS", "Slot", "cuda_visible_devices", "discover_slots"]

log = logging.getLogger("remote_gpu_server")

#: CPU slots offered by ``--slots auto`` on a machine without GPUs.
DEFAULT_CPU_SLOTS = 2


def _nvml_gpus() -> list[dict[str, Any]] | None:
    """GPUs NVML sees, or None (with the reason logged by the caller)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
            })
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _cpu_slots(n: int) -> list[Slot]:
    return [Slot(SlotId(f"cpu{i}"), "cpu", i, f"CPU slot {i}") for i in range(n)]


def discover_slots(spec: str = "auto") -> list[Slot]:
    """Parse ``--slots`` and return the slots; raise ValueError if it is off."""
    spec = spec.strip()
    if spec.startswith("cpu:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"--slots {spec!r}: cpu:N needs a whole number") from None
        if n < 1:
            raise ValueError("--slots cpu:N needs N >= 1")
        return _cpu_slots(n)
    try:
        gpus = _nvml_gpus() or []
        reason = "NVML found no GPU"
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError
        gpus, reason = [], f"NVML unavailable ({type(exc).__name__})"
    if spec == "auto":
        if not gpus:
            n = min(DEFAULT_CPU_SLOTS, os.cpu_count() or 1)
            log.warning("%s: falling back to %d CPU slot(s); use --slots cpu:N to choose", reason, n)
            return _cpu_slots(n)
        return [Slot(SlotId(f"gpu{g['index']}"), "gpu", g["index"], g["name"], g["uuid"]) for g in gpus]
    try:
        wanted = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--slots {spec!r}: expected auto, cpu:N or GPU indices like 0,1") from None
    if not wanted:
        raise ValueError("--slots names no GPU")
    by_index = {g["index"]: g for g in gpus}
    slots = []
    for i in wanted:
        g = by_index.get(i)
        if gpus and g is None:
            raise ValueError(f"--slots: NVML sees no GPU {i} (it sees {sorted(by_index)})")
        slots.append(Slot(SlotId(f"gpu{i}"), "gpu", i, g["name"] if g else f"GPU {i}",
                          g["uuid"] if g else ""))
    return slots
