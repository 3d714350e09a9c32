"""The output journal's writer: every output row reaches the store, in order, once.

Sessions and batch jobs :meth:`Journal.append` each output message as it
happens, without waiting; one task writes what has piled up in one
transaction at a time, in the order appended. A write that fails (the
database went away) is retried with a growing pause, the failed rows
first, so the journal keeps its order; the store skips a row already
written (same session and sequence number), so a retry never writes one
twice. :meth:`Journal.flush` waits until everything appended so far is
written (before reading the journal back).

Records that could not be written when they happened, because the
database was away (a cell's job, the end of a job, a lease's start or
end), go the same way with :meth:`Journal.later`: written in turn after
the rows appended before them, retried while the database is away. One
that fails for another reason is logged and dropped, so that it never
holds up the rows behind it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import DatabaseUnavailable, OutputRow

__all__ = ["Journal", "LateWrite"]

log = logging.getLogger("remote_gpu_server")

#: Pauses between retries of a failed write, in seconds; the last repeats.
RETRY_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
#: Most rows kept in memory while the database is away; older ones are dropped.
MAX_PENDING = 200_000
#: What says the database is away for now (a later write is tried again), not that the write is wrong.
_AWAY = (DatabaseUnavailable, OSError, sqlite3.OperationalError)


@dataclasses.dataclass(frozen=True)
class LateWrite:
    """A store write to make in turn: ``write()`` does it; ``what`` names it in the log."""

    write: Callable[[], Awaitable[Any]]
    what: str


class Journal:
    """Call :meth:`close` at the end: it writes what is left (within ``timeout``)."""

    def __init__(self, write: Callable[[Sequence[OutputRow]], Awaitable[None]]) -> None:
        self._write = write
        self._rows: list[OutputRow | LateWrite] = []
        self._appended = 0  # rows ever appended
        self._written = 0  # rows ever written (or dropped)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def pending(self) -> int:
        return len(self._rows)

    def append(self, row: OutputRow) -> None:
        self._queue(row)

    def later(self, write: Callable[[], Awaitable[Any]], what: str) -> None:
        """Make the store write ``write()`` after the rows appended so far,
        retrying while the database is away (see the module docstring)."""
        log.info("%s waits for the database", what)
        self._queue(LateWrite(write, what))

    def _queue(self, item: OutputRow | LateWrite) -> None:
        self._rows.append(item)
        self._appended += 1
        if len(self._rows) > MAX_PENDING:
            dropped = self._rows.pop(0)
            self._written += 1
            log.error("the output journal dropped its oldest unwritten %s: the database has been "
                      "away too long", "row" if isinstance(dropped, OutputRow) else dropped.what)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _batch(self) -> list[OutputRow] | LateWrite:
        """What to write next: the rows up to the first late write, or that write."""
        first = self._rows[0]
        if isinstance(first, LateWrite):
            return first
        rows: list[OutputRow] = []
        for item in self._rows:
            if not isinstance(item, OutputRow):
                break
            rows.append(item)
        return rows

    async def _run(self) -> None:
        attempt = 0
        while self._rows:
            batch = self._batch()
            try:
                if isinstance(batch, LateWrite):
                    try:
                        await batch.write()
                    except _AWAY:
                        raise
                    except Exception:  # wrong, not late: it must not hold up what follows
                        log.exception("%s could not be written; dropped", batch.what)
                else:
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
            if isinstance(batch, LateWrite):
                log.info("%s is written", batch.what)
            done = 1 if isinstance(batch, LateWrite) else len(batch)
            del self._rows[:done]
            self._written += done
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
            log.error("%d output row(s) or record(s) could not be written before the server stopped",
                      len(self._rows))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
