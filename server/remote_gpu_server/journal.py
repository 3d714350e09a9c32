"""The output journal's writer: every output row reaches the store, in order, once.

Sessions and batch jobs :meth:`Journal.append` each output message as it
happens, without waiting; one task writes what has piled up in one
transaction at a time, in the order appended. A write that fails (the
database went away) is retried with a growing pause, the failed rows
first, so the journal keeps its order; the store skips a row already
written (same session and sequence number), so a retry never writes one
twice. :meth:`Journal.flush` waits until everything appended so far is
written (before reading the journal back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from .store import OutputRow

__all__ = ["Journal"]

log = logging.getLogger("remote_gpu_server")

#: Pauses between retries of a failed write, in seconds; the last repeats.
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
#: Most rows kept in memory while the database is away; older ones are dropped.
MAX_PENDING = 200_000


class Journal:
    """Call :meth:`close` at the end: it writes what is left (within ``timeout``)."""

    def __init__(self, write: Callable[[Sequence[OutputRow]], Awaitable[None]]) -> None:
        self._write = write
        self._rows: list[OutputRow] = []
        self._appended = 0  # rows ever appended
        self._written = 0  # rows ever written (or dropped)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def pending(self) -> int:
        return len(self._rows)

    def append(self, row: OutputRow) -> None:
        self._rows.append(row)
        self._appended += 1
        if len(self._rows) > MAX_PENDING:
            del self._rows[0]
            self._written += 1
            log.error("the output journal dropped its oldest unwritten row: the database has been "
                      "away too long")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        attempt = 0
        while self._rows:
            batch = list(self._rows)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                if not self._failing:
                    log.warning("writing the output journal failed (%s): retrying, in order", exc)
                self._failing = True
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if self._failing:
                log.warning("the output journal is written again")
            self._failing, attempt = False, 0
            del self._rows[: len(batch)]
            self._written += len(batch)
            self._changed.set()
            self._changed.clear()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row appended so far is written; False if ``timeout`` passed first."""
        target = self._appended

        async def wait() -> None:
            while self._written < target:
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        if not await self.flush(timeout) and self._rows:
            log.error("%d output row(s) could not be written before the server stopped", len(self._rows))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
