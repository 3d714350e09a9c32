"""A worker's stdout and stderr: a pipe of its own, read into the server's log.

A worker must not inherit the server's stdout and stderr: they may be the
server's log file, which its user's code could then write into (ipykernel
keeps a copy of the original descriptors). Each worker gets one pipe for
both instead; the server logs what comes through it line by line, marked
with the worker's name, up to :data:`MAX_LOGGED` bytes (a startup failure's
traceback fits), and reads and drops the rest so the worker never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

__all__ = ["MAX_LOGGED", "WorkerOutput"]

log = logging.getLogger("remote_gpu_server")

#: Bytes of one worker's output that reach the log.
MAX_LOGGED = 64 * 1024
_LINE = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class WorkerOutput:
    """Give :attr:`fd` to the worker as stdout and stderr, then call
    :meth:`started` (which closes the server's copy of it and starts reading)
    and, at the end, :meth:`close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._read, self.fd = os.pipe()
        self._task: asyncio.Task[None] | None = None
        self._logged = 0

    def started(self) -> None:
        os.close(self.fd)
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        pipe = os.fdopen(self._read, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        pending = b""
        try:
            while chunk := await reader.read(1 << 16):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log(line)
                pending = pending[-_LINE:]
            if pending:
                self._log(pending)
        finally:
            transport.close()

    def _log(self, raw: bytes) -> None:
        if self._logged >= MAX_LOGGED:
            return
        self._logged += len(raw) + 1
        # Its user's code may write here: one marked line each, no escapes.
        text = _CONTROL.sub("?", raw[:_LINE].decode("utf-8", "replace"))
        log.info("worker %s: %s", self.name, text)
        if self._logged >= MAX_LOGGED:
            log.info("worker %s: further output is dropped", self.name)

    async def close(self) -> None:
        if self._task is None:
            for fd in (self._read, self.fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            return
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=1)
        except (TimeoutError, asyncio.TimeoutError):
            task.cancel()
        except Exception:
            log.exception("worker %s: reading its output failed", self.name)
