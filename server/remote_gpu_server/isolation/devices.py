"""This host's NVIDIA device files, and the few of them one worker may see.

A process reaches a GPU through its device file ``/dev/nvidia<minor>`` and
the control files every CUDA process opens (``nvidiactl``, ``nvidia-uvm``,
``nvidia-uvm-tools``, ``nvidia-modeset``); a MIG instance also needs its
capability files ``/dev/nvidia-caps/nvidia-cap<N>``. ``CUDA_VISIBLE_DEVICES``
only chooses among the GPUs a process can open, and any process may change
it: the fence is which files a worker's ``/dev`` holds.
:meth:`DeviceTree.for_worker` lists them for a worker's
``CUDA_VISIBLE_DEVICES``: the control files and its GPUs' files; nothing at
all for a worker on CPU slots. The isolation puts just these in the worker's
``/dev`` (:mod:`.confinement` as root, :mod:`.sandbox` under bubblewrap).

CUDA numbers the GPUs it can open from 0, so a fenced worker's
``CUDA_VISIBLE_DEVICES`` names its GPUs by UUID
(:meth:`DeviceTree.visible_devices`): an index, as Ray gives one, would
count among GPUs the worker no longer sees.

A GPU's file is found by its minor number, never by its index (the two
differ where the driver numbered the GPUs in another order than their PCI
addresses): NVML's ``nvmlDeviceGetMinorNumber``, or, where NVML cannot be
loaded, the driver's own ``/proc/driver/nvidia/gpus/<PCI address>/information``
("Device Minor"), the index being the GPU's place in PCI order (as NVML
and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` count). A GPU whose minor number is
not known gets no file: a worker never gets more than its lease, at worst
less. A MIG instance's capability numbers come from the driver's
``/proc/driver/nvidia/capabilities/gpu<minor>/mig/gi<N>[/ci<M>]/access``.

For tests only, the folder of these files can be another than ``/``:
``rgpu serve`` reads ``$RGPU_TEST_DEVICE_ROOT`` (see :data:`TEST_ROOT_VAR`)
into :attr:`.isolation.IsolationConfig.device_root`, and its ``dev`` and
``proc/driver/nvidia`` then stand in for the host's (device files a test
made with ``mknod``). Set by mistake it can only take GPUs away: workers
then see none of the host's files.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["CONTROL_FILES", "TEST_ROOT_VAR", "DeviceFile", "DeviceTree", "GpuFiles", "test_device_root"]

log = logging.getLogger("remote_gpu_server")

#: The environment variable that points ``rgpu serve`` at a stand-in for ``/`` (tests only).
TEST_ROOT_VAR = "RGPU_TEST_DEVICE_ROOT"
#: The files every CUDA process opens besides its GPUs', where they exist.
CONTROL_FILES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

_DRIVER = Path("proc/driver/nvidia")
_MINOR = re.compile(r"^Device Minor:\s*(\d+)\s*$", re.MULTILINE)
_UUID = re.compile(r"^GPU UUID:\s*(\S+)\s*$", re.MULTILINE)
_CAP_MINOR = re.compile(r"^DeviceFileMinor:\s*(\d+)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class DeviceFile:
    """A device file a worker gets: where it is here, and its name under the worker's ``/dev``."""

    source: Path
    #: ``nvidia3``, ``nvidia-caps/nvidia-cap21``.
    name: str


@dataclasses.dataclass(frozen=True)
class GpuFiles:
    """One GPU of this host: its NVML index (PCI order), UUID and minor number."""

    index: int
    minor: int
    uuid: str = ""


class DeviceTree:
    """The NVIDIA device files under ``root`` (``/`` but in tests); make it with :meth:`probe`."""

    def __init__(self, root: Path = Path("/"), gpus: Iterable[GpuFiles] = (), source: str = "") -> None:
        self.root = root
        self.gpus = tuple(gpus)
        #: Where the minor numbers came from ("NVML", "the driver's /proc files"), for the log.
        self.source = source

    @property
    def dev(self) -> Path:
        """The folder of the device files (``/dev`` but in tests)."""
        return self.root / "dev"

    @classmethod
    def probe(cls, root: Path | None = None, nvml: Any | None = None) -> DeviceTree:
        """This host's GPUs and their files, through ``nvml`` (``pynvml`` by default,
        or a test double), else the driver's ``/proc`` files, else none."""
        root = root or Path("/")
        try:
            return cls(root, _nvml_gpus(nvml or importlib.import_module("pynvml")), "NVML")
        except Exception as exc:  # no library, no driver, no GPU, an old NVML
            nvml_problem = f"{type(exc).__name__}: {exc}"
        gpus = _driver_gpus(root / _DRIVER / "gpus")
        if gpus:
            return cls(root, gpus, "the driver's /proc files")
        if (root / "dev" / "nvidiactl").exists():
            log.warning("NVIDIA device files are here but neither NVML (%s) nor the driver's /proc files "
                        "say which GPU is which: workers get no GPU", nvml_problem)
        return cls(root, (), "")

    def make_missing_files(self) -> None:
        """Make this host's missing NVIDIA device files, as CUDA's first use would
        (``nvidia-modprobe``; ``nvidia-uvm`` is often made only then): a worker's
        ``/dev`` is set when it starts, and nothing in it can make them later."""
        if self.root != Path("/") or not self.gpus:
            return  # a test's stand-in, or no GPU
        calls = [[f"-c={g.minor}"] for g in self.gpus if not (self.dev / f"nvidia{g.minor}").exists()]
        if not (self.dev / "nvidia-uvm").exists():
            calls.append(["-u", "-c=0"])
        modprobe = shutil.which("nvidia-modprobe")
        if calls and modprobe is not None:
            for arguments in calls:
                subprocess.run([modprobe, *arguments], capture_output=True, timeout=60, check=False)
        missing = [f"nvidia{g.minor}" for g in self.gpus if not (self.dev / f"nvidia{g.minor}").exists()]
        missing += [name for name in ("nvidiactl", "nvidia-uvm") if not (self.dev / name).exists()]
        if missing:
            why = "nvidia-modprobe could not make them" if modprobe else "there is no nvidia-modprobe"
            log.warning("%s missing from %s, and %s: workers cannot use CUDA until they are made (run "
                        "'nvidia-modprobe -u -c=0' as root, or any CUDA program once)", ", ".join(missing),
                        self.dev, why)

    def gpu(self, entry: str) -> GpuFiles | None:
        """The GPU a ``CUDA_VISIBLE_DEVICES`` entry names (an index or a UUID), or None."""
        entry = entry.strip()
        if entry.isdigit():
            return next((g for g in self.gpus if g.index == int(entry)), None)
        return next((g for g in self.gpus if g.uuid and g.uuid == entry), None)

    def visible_devices(self, cuda_visible_devices: str) -> str:
        """``CUDA_VISIBLE_DEVICES`` with each GPU named by its UUID where it is known
        (a fenced worker's CUDA sees only its own GPUs, numbered from 0)."""
        entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
        return ",".join(gpu.uuid if (gpu := self.gpu(e)) is not None and gpu.uuid else e for e in entries)

    def for_worker(self, cuda_visible_devices: str) -> tuple[DeviceFile, ...]:
        """The device files of a worker with this ``CUDA_VISIBLE_DEVICES``: none for
        a worker without GPUs, else the control files and each named GPU's."""
        entries = [e for e in cuda_visible_devices.split(",") if e.strip()]
        if not entries:
            return ()
        files = [DeviceFile(self.dev / name, name) for name in CONTROL_FILES if (self.dev / name).exists()]
        for entry in entries:
            gpu = self.gpu(entry)
            if gpu is None:
                log.warning("CUDA_VISIBLE_DEVICES names %r, a GPU whose device file is not known here "
                            "(%s): the worker does not get it", entry.strip(), self.source or "no NVML")
                continue
            node = self.dev / f"nvidia{gpu.minor}"
            if node.exists():
                files.append(DeviceFile(node, node.name))
            files += self._mig_files(gpu.minor)
        return tuple(files)

    def _mig_files(self, minor: int) -> list[DeviceFile]:
        """The capability files of the MIG instances on the GPU with this minor number."""
        folder = self.root / _DRIVER / "capabilities" / f"gpu{minor}" / "mig"
        if not folder.is_dir():
            return []
        files = []
        for access in sorted([*folder.glob("gi*/access"), *folder.glob("gi*/ci*/access")]):
            try:
                found = _CAP_MINOR.search(access.read_text())
            except OSError:
                continue
            if found is not None:
                name = f"nvidia-caps/nvidia-cap{found.group(1)}"
                if (self.dev / name).exists():
                    files.append(DeviceFile(self.dev / name, name))
        return files

    def every_file(self) -> list[Path]:
        """Every NVIDIA device file here (for the groups that own them)."""
        return sorted(self.dev.glob("nvidia*")) + sorted(self.dev.glob("nvidia-caps/*"))


def _nvml_gpus(nvml: Any) -> list[GpuFiles]:
    nvml.nvmlInit()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            gpus.append(GpuFiles(index, int(nvml.nvmlDeviceGetMinorNumber(handle)),
                                 uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return gpus
    finally:
        nvml.nvmlShutdown()


def _driver_gpus(folder: Path) -> list[GpuFiles]:
    """The GPUs the driver lists in ``/proc/driver/nvidia/gpus``, in PCI order."""
    if not folder.is_dir():
        return []
    gpus = []
    for index, gpu in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        try:
            text = (gpu / "information").read_text()
        except OSError:
            continue
        minor, uuid = _MINOR.search(text), _UUID.search(text)
        if minor is not None:
            gpus.append(GpuFiles(index, int(minor.group(1)), uuid.group(1) if uuid else ""))
    return gpus


def test_device_root() -> Path | None:
    """The stand-in for ``/`` that ``$RGPU_TEST_DEVICE_ROOT`` names (tests only), else None."""
    value = os.environ.get(TEST_ROOT_VAR)
    return Path(value) if value else None
