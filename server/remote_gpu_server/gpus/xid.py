"""Xid errors: what NVML reports when a GPU hits a fault, kept for causes of death.

An Xid is the driver's report of a GPU error: a page fault from a bad
pointer (31), a GPU that stopped answering (43), a double-bit ECC error
(48), a GPU that fell off the bus (79), ... NVML delivers the critical ones
as events (``nvmlEventTypeXidCriticalError``). :class:`XidWatcher` waits for
them on this host's GPUs in a thread of its own and remembers, per slot,
which Xid came when. :meth:`XidWatcher.describe` gives the clause a cause of
death ends with ("the GPU reported Xid 79 (it fell off the bus) while the
worker ran"), and ``on_event`` tells the server at once, which holds the
slot out until its GPU has been read again (see :mod:`.drain`).

Where NVML or its events are not there (no GPU, a GPU that does not support
them, a server that may not register them), nothing is watched and nothing
is said. Slots on Ray nodes are not watched (their node's agent would have
to); their causes of death say what the node's worker reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from remote_gpu_core.ids import SlotId

from .slots import Slot

__all__ = ["XID_MEANINGS", "XidEvent", "XidWatcher"]

log = logging.getLogger("remote_gpu_server")

#: What the common Xids mean, in a few words (NVIDIA's Xid catalog).
XID_MEANINGS = {
    13: "a graphics engine exception", 31: "a GPU memory page fault", 32: "a corrupted push buffer stream",
    43: "the GPU stopped processing", 45: "preemptive cleanup after an earlier error",
    48: "a double-bit ECC error", 61: "an internal micro-controller breakpoint",
    62: "an internal micro-controller halt", 63: "an ECC page retirement or row remap",
    64: "an ECC page retirement or row remap failure", 68: "a video processor exception",
    69: "a graphics engine class error", 74: "an NVLink error", 79: "the GPU fell off the bus",
    92: "a high single-bit ECC error rate", 94: "a contained ECC error", 95: "an uncontained ECC error",
    109: "a context switch timeout", 119: "a GSP RPC timeout", 120: "a GSP error",
}
#: How long one wait for events lasts, in milliseconds (how fast close() returns).
WAIT_MS = 500


@dataclasses.dataclass(frozen=True)
class XidEvent:
    slot: SlotId
    xid: int
    at: float  # time.monotonic()

    @property
    def meaning(self) -> str:
        return XID_MEANINGS.get(self.xid, "see NVIDIA's Xid catalog")


class XidWatcher:
    """Watches this host's GPU ``slots`` through ``nvml`` (``pynvml`` or a test double).

    Call :meth:`start` on the event loop (False: nothing can be watched) and
    :meth:`close` at the end; ``on_event`` is called on the loop for each Xid.
    """

    def __init__(self, nvml: Any, slots: Sequence[Slot],
                 on_event: Callable[[XidEvent], None] | None = None) -> None:
        self.nvml = nvml
        self.slots = [s for s in slots if s.kind == "gpu" and not s.node]
        self.on_event = on_event
        self.events: list[XidEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        if not self.slots:
            return False
        nv = self.nvml
        try:
            nv.nvmlInit()
        except Exception as exc:
            log.info("Xid errors are not watched: NVML is unavailable (%s)", exc)
            return False
        try:
            events = nv.nvmlEventSetCreate()
            by_uuid: dict[str, SlotId] = {}
            for slot in self.slots:
                handle = (nv.nvmlDeviceGetHandleByUUID(slot.uuid) if slot.uuid
                          else nv.nvmlDeviceGetHandleByIndex(slot.index))
                try:
                    nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, events)
                except nv.NVMLError as exc:
                    log.info("slot %s: its Xid errors cannot be watched (%s)", slot.id, exc)
                    continue
                by_uuid[_text(nv.nvmlDeviceGetUUID(handle))] = slot.id
        except Exception as exc:
            log.info("Xid errors are not watched: %s", exc)
            nv.nvmlShutdown()
            return False
        if not by_uuid:
            nv.nvmlEventSetFree(events)
            nv.nvmlShutdown()
            return False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(events, by_uuid), name="rgpu-xid",
                                        daemon=True)
        self._thread.start()
        return True

    def _run(self, events: Any, by_uuid: dict[str, SlotId]) -> None:
        nv = self.nvml
        timeout = getattr(nv, "NVMLError_Timeout", ())
        try:
            while not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait(events, WAIT_MS)
                except timeout:
                    continue
                except nv.NVMLError as exc:
                    log.warning("waiting for Xid errors failed (%s); trying again", exc)
                    self._stop.wait(1.0)
                    continue
                try:
                    slot = by_uuid.get(_text(nv.nvmlDeviceGetUUID(data.device)))
                except nv.NVMLError:
                    slot = None
                if slot is None:
                    continue
                event = XidEvent(slot, int(data.eventData), time.monotonic())
                log.error("slot %s: the GPU reported Xid %d (%s)", slot, event.xid, event.meaning)
                with self._lock:
                    self.events.append(event)
                    del self.events[:-1000]
                if self.on_event is not None and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.on_event, event)
        finally:
            try:
                nv.nvmlEventSetFree(events)
            finally:
                nv.nvmlShutdown()

    def since(self, slots: Sequence[Slot] | Sequence[SlotId], since: float) -> list[XidEvent]:
        """The Xids of ``slots`` that came at or after ``since`` (``time.monotonic()``)."""
        ids = {getattr(s, "id", s) for s in slots}
        with self._lock:
            return [e for e in self.events if e.slot in ids and e.at >= since]

    def describe(self, slots: Sequence[Slot], since: float) -> str | None:
        """``the GPU reported Xid 79 (the GPU fell off the bus) while it ran``, or None."""
        found = self.since(slots, since)
        if not found:
            return None
        seen: dict[int, XidEvent] = {}
        for event in found:
            seen.setdefault(event.xid, event)
        xids = ", ".join(f"Xid {e.xid} ({e.meaning})" for e in seen.values())
        return f"the GPU reported {xids} while it ran"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * WAIT_MS / 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
