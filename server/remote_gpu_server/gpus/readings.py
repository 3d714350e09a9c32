"""What every slot is doing, read every few seconds, and whether it is healthy.

GPU slots are read through NVML (``pynvml``): utilization, memory,
temperature, power, the processes holding memory on the GPU, and health. A
GPU is **unhealthy** while it has uncorrected volatile ECC errors, a page
retirement pending, a row remap pending or failed (the GPU needs a reset),
or NVML cannot read it at all (fallen off the bus). An unhealthy slot must
not be leased until it recovers; :meth:`Readings.healthy` answers that and
``on_health`` is called whenever a slot's health changes.

CPU slots (a machine without GPUs) report the CPU percentage and resident
memory of their workers' process trees instead, through ``psutil``; they
are always healthy. A CPU slot's ``memory_total`` is its worker's
allowance, not the host's RAM: a fair share, the host's RAM divided by the
number of CPU slots (there is no per-worker memory setting yet; one would
replace this share); ``host_memory_total`` gives the host's RAM.

Every reading also goes into a :class:`~.history.ReadingHistory` of the last
few minutes (``Readings.history``), which the sidebar plots.

Each process NVML lists on a GPU is attributed to the worker it belongs to,
where it belongs to one (its ``owner``, the worker's main pid; see
:mod:`.owners`), on the node both run on: the GPU check (:mod:`.gpu_fence`)
stops a worker found on a GPU it did not lease.

The NVML module is a parameter (``nvml=``) so tests can pass a test double;
by default ``pynvml`` is imported, and only when there are GPU slots. CUDA
is never initialised here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from remote_gpu_core.ids import SlotId

from .discovery import Slot
from .history import HistoryPoint, ReadingHistory
from ..processes.ladder import Scope
from ..processes.owners import owner, scopes_of

__all__ = ["NodeReader", "ProcessReading", "Readings", "RemoteReader", "SlotReading", "process_holders"]

log = logging.getLogger("remote_gpu_server")

#: Seconds between two readings of every slot.
DEFAULT_PERIOD = 3.0


@dataclasses.dataclass(frozen=True)
class ProcessReading:
    """A process using a slot; ``worker`` is False for one this server did not start
    (on a GPU: another program, or a leftover that still holds memory). ``owner``
    (GPU readings): the main pid of the worker it belongs to, or None (see :mod:`.owners`)."""

    pid: int
    memory: int  # bytes
    worker: bool = True
    owner: int | None = None


@dataclasses.dataclass(frozen=True)
class SlotReading:
    """One slot at one moment; a field NVML or psutil could not give is None.

    ``utilization`` is a percentage (a CPU slot's may exceed 100 on several
    cores); memory is in bytes, temperature in °C, power in watts.
    ``memory_total`` is what the slot's worker may use: a GPU's memory, or a
    CPU slot's share of the host's RAM, ``host_memory_total`` (None on a GPU).
    ``device``: the index on its node of the GPU read (None for a CPU slot).
    """

    utilization: float | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    temperature: float | None = None
    power: float | None = None
    processes: tuple[ProcessReading, ...] = ()
    healthy: bool = True
    problem: str | None = None
    host_memory_total: int | None = None
    device: int | None = None

    def as_json(self, pids: bool = True) -> dict[str, Any]:
        """The ``readings`` object of ``GET /api/status``; each process's pid is
        None unless ``pids`` (an admin asks)."""
        return {
            "utilization": self.utilization,
            "memory_used": self.memory_used,
            "memory_total": self.memory_total,
            "temperature": self.temperature,
            "power": self.power,
            "processes": [{"pid": p.pid if pids else None, "memory": p.memory, "worker": p.worker}
                          for p in self.processes],
            "host_memory_total": self.host_memory_total,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _NvmlReader:
    """Reads GPU slots through an NVML module (``pynvml`` or a test double)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        nvml.nvmlInit()

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass

    def _handle(self, slot: Slot) -> Any:
        if slot.uuid:
            return self.nvml.nvmlDeviceGetHandleByUUID(slot.uuid)
        return self.nvml.nvmlDeviceGetHandleByIndex(slot.index)

    def _optional(self, read: Callable[[], Any]) -> Any:
        """``read()``, or None where this GPU does not support it."""
        try:
            return read()
        except self.nvml.NVMLError:
            return None

    def read(self, slot: Slot, workers: set[int], scopes: list[Scope] | None = None) -> SlotReading:
        """``workers``: the pids of the slot's workers; ``scopes``: every worker on this
        node, whose processes are told apart (each process's ``owner``)."""
        nv = self.nvml
        try:
            handle = self._handle(slot)
        except nv.NVMLError as exc:
            return SlotReading(healthy=False, problem=f"NVML cannot read this GPU: {exc}", device=slot.index)
        util = self._optional(lambda: nv.nvmlDeviceGetUtilizationRates(handle))
        mem = self._optional(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        temp = self._optional(lambda: nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
        power = self._optional(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        procs = self._optional(lambda: nv.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        problem = self._problem(handle)
        return SlotReading(
            utilization=float(util.gpu) if util is not None else None,
            memory_used=int(mem.used) if mem is not None else None,
            memory_total=int(mem.total) if mem is not None else None,
            temperature=float(temp) if temp is not None else None,
            power=power / 1000.0 if power is not None else None,  # NVML reports milliwatts
            processes=tuple(ProcessReading(int(p.pid), int(p.usedGpuMemory or 0), int(p.pid) in workers,
                                           owner(int(p.pid), scopes) if scopes else None)
                            for p in procs),
            healthy=problem is None,
            problem=problem,
            device=slot.index,
        )

    def holders(self, slot: Slot, pids: frozenset[int]) -> tuple[ProcessReading, ...]:
        """Which of ``pids`` hold memory on this GPU now (NVML's compute processes)."""
        nv = self.nvml
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(self._handle(slot))
        except nv.NVMLError as exc:  # a GPU NVML cannot read is held out by its health anyway
            log.info("slot %s: NVML cannot list its processes: %s", slot.id, exc)
            return ()
        return tuple(ProcessReading(int(p.pid), int(p.usedGpuMemory or 0), False)
                     for p in procs if int(p.pid) in pids)

    def _problem(self, handle: Any) -> str | None:
        """Why this GPU must not be leased now, or None if it is fine."""
        nv = self.nvml
        ecc = self._optional(lambda: nv.nvmlDeviceGetTotalEccErrors(
            handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))
        if ecc:
            return f"{ecc} uncorrected ECC error(s) since the last reset"
        pending = self._optional(lambda: nv.nvmlDeviceGetRetiredPagesPendingStatus(handle))
        if pending == nv.NVML_FEATURE_ENABLED:
            return "a memory page retirement is pending: the GPU needs a reset"
        remap = self._optional(lambda: nv.nvmlDeviceGetRemappedRows(handle))
        if remap is not None:
            _corrected, _uncorrected, is_pending, failed = remap
            if failed:
                return "a memory row remapping failed: the GPU needs service"
            if is_pending:
                return "a memory row remapping is pending: the GPU needs a reset"
        return None


def process_holders(pids: frozenset[int]) -> tuple[ProcessReading, ...]:
    """Which of ``pids`` still run (a zombie does not), with their resident memory."""
    found = []
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(ProcessReading(pid, int(proc.memory_info().rss), False))
        except psutil.Error:
            continue
    return tuple(found)


class _ProcessReader:
    """CPU% and resident memory of process trees, with psutil.

    ``psutil.Process.cpu_percent`` measures since its previous call on the
    same object, so the objects are kept from one reading to the next.
    ``shares`` is the number of CPU slots the host's RAM is divided among.
    """

    def __init__(self, shares: int = 1) -> None:
        self._known: dict[int, psutil.Process] = {}
        self.shares = max(1, shares)

    def read(self, pids: list[int]) -> SlotReading:
        seen: dict[int, psutil.Process] = {}
        cpu = 0.0
        processes = []
        for pid in pids:
            try:
                root = self._known.get(pid) or psutil.Process(pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            rss = 0
            for proc in tree:
                proc = self._known.get(proc.pid) or proc
                try:
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue
                seen[proc.pid] = proc
            processes.append(ProcessReading(pid, rss))
        self._known = seen
        host = int(psutil.virtual_memory().total)
        return SlotReading(
            utilization=round(cpu, 1),
            memory_used=sum(p.memory for p in processes),
            memory_total=host // self.shares,
            processes=tuple(processes),
            host_memory_total=host,
        )


class NodeReader:
    """Reads slots on the node it runs on: each GPU through NVML where the node
    has it, else (no driver: CPU slots, or a cluster's counted GPUs) the CPU and
    memory of the processes given for the slot. A Ray node runs one in an
    actor; keep it from one reading to the next (CPU percentages need that).
    """

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml_module = nvml
        self._nvml: _NvmlReader | None = None
        self._tried = False
        self._procs: dict[str, _ProcessReader] = {}

    def _gpu(self) -> _NvmlReader | None:
        if not self._tried:
            self._tried = True
            try:
                self._nvml = _NvmlReader(self._nvml_module or importlib.import_module("pynvml"))
            except Exception as exc:
                log.info("NVML unavailable on this node, reading processes instead: %s", exc)
        return self._nvml

    def read(self, requests: list[tuple[str, int, list[int]]], shares: int = 1) -> dict[str, SlotReading]:
        """``requests``: (slot id, its GPU's index on this node, its workers' pids);
        every worker of the node is among them, so each process on a GPU is told
        which of them it belongs to."""
        gpu = self._gpu()
        readings: dict[str, SlotReading] = {}
        scopes = scopes_of(pid for _slot, _device, pids in requests for pid in pids) if gpu is not None else []
        for slot_id, device, pids in requests:
            if gpu is not None:
                readings[slot_id] = gpu.read(Slot(SlotId(slot_id), "gpu", device, ""), set(pids), scopes)
            else:
                reader = self._procs.setdefault(slot_id, _ProcessReader(shares))
                reader.shares = max(1, shares)
                readings[slot_id] = reader.read(pids)
        return readings

    def holders(self, requests: list[tuple[str, int, list[int]]]) -> dict[str, tuple[ProcessReading, ...]]:
        """``requests``: (slot id, its GPU's index on this node, pids) → which of the
        pids still hold that slot (see :mod:`.drain`)."""
        gpu = self._gpu()
        found = {}
        for slot_id, device, pids in requests:
            wanted = frozenset(pids)
            found[slot_id] = (gpu.holders(Slot(SlotId(slot_id), "gpu", device, ""), wanted) if gpu is not None
                              else process_holders(wanted))
        return found

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()


#: Reads the slots of other nodes: (slots, their workers' pids, their GPUs' indices) → readings.
RemoteReader = Callable[[list[Slot], dict[SlotId, list[int]], dict[SlotId, int]],
                        Awaitable[dict[SlotId, SlotReading]]]


class Readings:
    """Keeps the latest :class:`SlotReading` of every slot.

    ``pids(slot_id)`` lists the worker processes on a slot.
    ``nvml`` is the NVML module to use for GPU slots (default: ``pynvml``).
    ``on_health(slot_id, healthy, problem)`` is called, on the event loop,
    when a slot's health changes; ``on_read()`` after every reading.
    ``scopes()`` lists this host's workers (see :mod:`.owners`), listed on
    the event loop before each reading. Call :meth:`refresh` (one reading now) and
    :meth:`start` (a reading every ``period``) on the event loop, and
    :meth:`close` at the end; :meth:`read_now` reads once, synchronously,
    without calling ``on_health``. Each reading is also added to
    :attr:`history`.
    """

    def __init__(self, slots: list[Slot], pids: Callable[[SlotId], list[int]], *,
                 nvml: Any | None = None, period: float = DEFAULT_PERIOD,
                 on_health: Callable[[SlotId, bool, str | None], None] | None = None,
                 remote: RemoteReader | None = None,
                 devices: Callable[[SlotId], int | None] = lambda slot: None,
                 scopes: Callable[[], list[Scope]] = lambda: [],
                 on_read: Callable[[], object] | None = None) -> None:
        self.slots = list(slots)
        # Where this host's workers' processes are, to tell whose a GPU's are;
        # ``on_read`` is called on the loop after each reading (the GPU check).
        self._scopes = scopes
        self.on_read = on_read
        # Slots of other nodes (a Ray cluster's) are read there, through
        # ``remote``; ``devices`` names the GPU a slot's worker was given.
        self._remote = remote
        self._devices = devices
        self.period = period
        self.on_health = on_health
        self._pids = pids
        self._latest: dict[SlotId, SlotReading] = {s.id: SlotReading() for s in slots}
        cpu_slots = [s for s in slots if s.kind != "gpu"]
        self._cpu = {s.id: _ProcessReader(len(cpu_slots)) for s in cpu_slots}
        self.history = ReadingHistory([s.id for s in slots])
        self._nvml: _NvmlReader | None = None
        self._nvml_failed = False  # said once, not at every reading
        self._nvml_module = nvml
        self._task: asyncio.Task[None] | None = None
        self._reading = asyncio.Lock()  # one reading at a time: readers keep state

    def _gpu_reader(self) -> _NvmlReader | None:
        if self._nvml is None and not self._nvml_failed and any(
                s.kind == "gpu" and not s.node for s in self.slots):
            try:
                module = self._nvml_module or importlib.import_module("pynvml")
                self._nvml = _NvmlReader(module)
            except Exception as exc:
                self._nvml_failed = True
                log.warning("NVML unavailable, GPU readings are off: %s", exc)
                return None
        return self._nvml

    def add(self, slots: list[Slot]) -> None:
        """Read these slots too from now on (they joined the server)."""
        for slot in slots:
            if slot.id not in self._latest:
                self.slots.append(slot)
                self._latest[slot.id] = SlotReading()
                if slot.kind != "gpu":
                    self._cpu[slot.id] = _ProcessReader()
        shares = len(self._cpu)
        for reader in self._cpu.values():
            reader.shares = max(1, shares)

    def latest(self, slot_id: SlotId) -> SlotReading:
        return self._latest[slot_id]

    def healthy(self, slot_id: SlotId) -> bool:
        """False while the slot must not be leased (see the module docstring)."""
        return self._latest[slot_id].healthy

    async def holders(self, slot_id: SlotId, pids: frozenset[int]) -> tuple[ProcessReading, ...]:
        """Which of ``pids`` (a stopped worker's) still hold ``slot_id``: on a GPU, those
        NVML lists as holding memory on it; on a CPU slot (or a GPU NVML cannot
        read), those still running. Another node's slot is asked of that node."""
        slot = next((s for s in self.slots if s.id == slot_id), None)
        if slot is None or not pids:
            return ()
        if slot.node:
            ask = getattr(self._remote, "holders", None)
            if ask is None:
                return ()
            found: tuple[ProcessReading, ...] = await ask(slot, pids, self._devices(slot.id))
            return found
        gpu = self._gpu_reader() if slot.kind == "gpu" else None
        if gpu is not None:
            return await asyncio.to_thread(gpu.holders, slot, pids)
        return await asyncio.to_thread(process_holders, pids)

    def _worker_pids(self) -> dict[SlotId, list[int]]:
        return {s.id: self._pids(s.id) for s in self.slots}

    def read_now(self, pids: dict[SlotId, list[int]] | None = None,
                 scopes: list[Scope] | None = None) -> dict[SlotId, tuple[bool, str | None]]:
        """Read every slot once; return the slots whose health changed.

        ``pids`` are every slot's worker processes and ``scopes`` this host's
        workers, listed on the event loop when this runs in a thread
        (default: asked for now).
        """
        pids = self._worker_pids() if pids is None else pids
        scopes = self._scopes() if scopes is None else scopes
        readings: dict[SlotId, SlotReading] = {}
        gpu = self._gpu_reader()
        for slot in self.slots:
            if slot.node:
                continue  # another node's: read there (refresh)
            if slot.kind == "gpu":
                if gpu is None:
                    continue
                readings[slot.id] = gpu.read(slot, set(pids.get(slot.id, [])), scopes)
            else:
                readings[slot.id] = self._cpu[slot.id].read(pids.get(slot.id, []))
        return self._keep(readings)

    def _keep(self, readings: dict[SlotId, SlotReading]) -> dict[SlotId, tuple[bool, str | None]]:
        """Store new readings; return the slots whose health changed."""
        changed: dict[SlotId, tuple[bool, str | None]] = {}
        for slot_id, reading in readings.items():
            before = self._latest.get(slot_id, SlotReading())
            self._latest[slot_id] = reading
            self.history.add(slot_id, HistoryPoint(time.time(), reading.utilization, reading.memory_used))
            if before.healthy != reading.healthy:
                changed[slot_id] = (reading.healthy, reading.problem)
        return changed

    async def _read_remote(self, pids: dict[SlotId, list[int]]) -> dict[SlotId, tuple[bool, str | None]]:
        remote = [s for s in self.slots if s.node]
        if not remote or self._remote is None:
            return {}
        devices = {s.id: device for s in remote if (device := self._devices(s.id)) is not None}
        return self._keep(await self._remote(remote, pids, devices))

    def start(self) -> None:
        """Read every ``period`` seconds in the background, the first time after one period."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def refresh(self) -> None:
        """Read every slot once now (in a thread) and report health changes.

        Each change is logged and passed to ``on_health`` before this
        returns, so a server that awaits it before serving never leases a
        slot already known to be unhealthy. A failed reading is logged and
        changes nothing.
        """
        async with self._reading:
            pids = self._worker_pids()
            try:
                changed = await asyncio.to_thread(self.read_now, pids, self._scopes())
                changed.update(await self._read_remote(pids))
            except Exception:
                log.exception("reading the slots failed")
                return
        for slot_id, (healthy, problem) in changed.items():
            if healthy:
                log.warning("slot %s is healthy again", slot_id)
            else:
                log.error("slot %s is unhealthy and will not be leased: %s", slot_id, problem)
            if self.on_health is not None:
                self.on_health(slot_id, healthy, problem)
        if self.on_read is not None:
            self.on_read()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._nvml is not None:
            self._nvml.close()
