"""``FakeNvml``: a test double of the ``pynvml`` module, for machines without a GPU.

It implements only the calls :mod:`remote_gpu_server.gpus.readings`,
:mod:`remote_gpu_server.gpus.xid` and :mod:`remote_gpu_server.isolation.devices` make, with pynvml's names, constants and error
classes. Each GPU is a :class:`FakeGpu` whose fields a test changes to
simulate load, ECC errors, pending page retirements or remaps, a GPU that
fell off the bus, or processes that keep memory on it;
:meth:`FakeNvml.xid` makes the driver report an Xid error.
"""

from __future__ import annotations

import dataclasses
import queue
from collections import namedtuple
from typing import Any

__all__ = ["FakeGpu", "FakeNvml"]

_Utilization = namedtuple("_Utilization", "gpu memory")
_Memory = namedtuple("_Memory", "total free used")
_Process = namedtuple("_Process", "pid usedGpuMemory")
_Event = namedtuple("_Event", "device eventType eventData gpuInstanceId computeInstanceId")


@dataclasses.dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    utilization: int = 0
    memory_used: int = 0
    memory_total: int = 80 * 2**30
    temperature: int = 35
    power_mw: int = 70_000
    processes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    ecc_uncorrected: int | None = 0  # None: ECC not supported (a consumer GPU)
    retired_pending: bool = False
    remap_pending: bool = False
    remap_failed: bool = False
    lost: bool = False
    #: Its device file's minor number (``/dev/nvidia<minor>``); None: its index.
    minor: int | None = None
    #: How many times its compute processes were read: a test waits on it for
    #: the server's next looks at who holds the GPU.
    process_reads: int = 0


class FakeNvml:
    """Pass as ``Readings(..., nvml=FakeNvml([...]))`` where ``pynvml`` would be used."""

    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_FEATURE_DISABLED = 0
    NVML_FEATURE_ENABLED = 1
    nvmlEventTypeXidCriticalError = 0x8

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_Timeout(NVMLError):
        pass

    def __init__(self, gpus: list[FakeGpu], *, library: bool = True) -> None:
        self.gpus = gpus
        self.library = library
        self.initialised = 0
        self._events: queue.Queue[Any] = queue.Queue()
        self._registered: list[FakeGpu] = []

    def xid(self, gpu: FakeGpu, xid: int) -> None:
        """The driver reports Xid ``xid`` on ``gpu`` (to whoever registered for it)."""
        if gpu in self._registered:
            self._events.put(_Event(gpu, self.nvmlEventTypeXidCriticalError, xid, 0, 0))

    def nvmlInit(self) -> None:
        if not self.library:
            raise self.NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def _gpu(self, handle: Any) -> FakeGpu:
        gpu = handle
        if gpu.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return gpu

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetMinorNumber(self, handle: FakeGpu) -> int:
        gpu = self._gpu(handle)
        return self.gpus.index(gpu) if gpu.minor is None else gpu.minor

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._gpu(self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return self._gpu(gpu)
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return self._gpu(handle).uuid

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, handle: FakeGpu, types: int, event_set: object) -> None:
        assert types == self.nvmlEventTypeXidCriticalError
        self._registered.append(handle)

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> Any:
        try:
            return self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise self.NVMLError_Timeout("Timeout") from None

    def nvmlEventSetFree(self, event_set: object) -> None:
        pass

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> Any:
        return _Utilization(self._gpu(handle).utilization, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        gpu = self._gpu(handle)
        return _Memory(gpu.memory_total, gpu.memory_total - gpu.memory_used, gpu.memory_used)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        return self._gpu(handle).temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        return self._gpu(handle).power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        gpu = self._gpu(handle)
        gpu.process_reads += 1
        return [_Process(pid, mem) for pid, mem in gpu.processes]

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeGpu, kind: int, counter: int) -> int:
        gpu = self._gpu(handle)
        if gpu.ecc_uncorrected is None:
            raise self.NVMLError_NotSupported("Not Supported")
        assert kind == self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED and counter == self.NVML_VOLATILE_ECC
        return gpu.ecc_uncorrected

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeGpu) -> int:
        gpu = self._gpu(handle)
        if gpu.ecc_uncorrected is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.NVML_FEATURE_ENABLED if gpu.retired_pending else self.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, handle: FakeGpu) -> tuple[int, int, int, int]:
        gpu = self._gpu(handle)
        if gpu.ecc_uncorrected is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return (0, 0, int(gpu.remap_pending), int(gpu.remap_failed))
