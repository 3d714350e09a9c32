"""What a session writes to the store: its output journal and its cells' jobs.

Every output message is handed to the journal (:mod:`..store.journal`) with
the session's next sequence number before it is sent, so nothing a cell
printed is lost with a connection; the journal writes it to the store in the
background, in order. What one cell may keep there is bounded
(``--max-output``, see :mod:`.output_bound`): past the bound the client
still gets everything, the journal a head, a tail and a line saying how much
it did not keep.

Each cell is a job, written while the worker already runs the cell and
ended with it. Where the database cannot take the job, the cell runs anyway
(:mod:`.unrecorded`) and its job is written once the database is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.ids import JobId, SessionId, SlotId

from ..store import DatabaseUnavailable, OutputRow, Store
from ..store.journal import Journal
from .output_bound import OutputBound
from .unrecorded import UnrecordedCell

__all__ = ["SessionRecorder"]

log = logging.getLogger("remote_gpu_server")


class SessionRecorder:
    """Writes down session ``session`` of ``user``; see the module docstring.

    ``seq`` is the journal's latest sequence number (a session found parked
    goes on from it); ``max_output`` is what the journal keeps of one cell
    (None: all).
    """

    def __init__(self, store: Store, journal: Journal, user: str, session: SessionId, *, seq: int = 0,
                 max_output: int | None = None) -> None:
        self.store = store
        self.journal = journal
        self.user = user
        self.session = session
        self._seq = seq
        self._output = OutputBound(max_output)  # what the journal keeps of each cell
        self._running_job: JobId | None = None
        self._unrecorded: UnrecordedCell | None = None  # the running cell, if the store could not take its job

    @property
    def seq(self) -> int:
        """The journal sequence number of the session's latest output."""
        return self._seq

    @property
    def running_job(self) -> JobId | None:
        """The running cell's job, once written."""
        return self._running_job

    # -- output -------------------------------------------------------------

    def output(self, job: JobId | None, jmsg: dict[str, Any]) -> int:
        """Journal the Jupyter message ``jmsg`` of ``job`` (None: of no job yet, or of
        none) under the session's next sequence number, within the cell's bound;
        returns that number."""
        self._seq += 1
        for kept in self._output.add(OutputRow(self.session, self._seq, job, jmsg["msg_type"], jmsg["content"])):
            self.journal.append(kept)
        return self._seq

    def new_cell(self) -> None:
        """A new cell: what the bound held back of the one before goes in first."""
        for kept in self._output.reset():
            self.journal.append(kept)

    def flush(self) -> None:
        """Journal what the bound holds back (the tail, and the line before it)."""
        for kept in self._output.flush():
            self.journal.append(kept)

    async def since(self, after: int) -> list[OutputRow]:
        """The journaled outputs after sequence number ``after``, once all of
        them are written (the bound's too)."""
        self.flush()
        await self.journal.flush(timeout=10)
        return await self.store.outputs_since(self.session, after)

    # -- jobs ---------------------------------------------------------------

    async def create_job(self, code: str, slots: Sequence[SlotId]) -> JobId | None:
        """The running cell's job, or None when the database cannot take it now:
        the cell runs anyway, and its job is written once the database is back."""
        unrecorded = UnrecordedCell(code, tuple(str(s) for s in slots))
        try:
            job = await self.store.create_job(self.user, self.session, code, list(slots), running=True)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("session %s: the cell runs; its job is written when the database is back: %s",
                        self.session[:8], exc)
            self._unrecorded = unrecorded
            return None
        self._running_job = job
        return job

    def unrecorded_output(self, seq: int) -> None:
        """The running cell, whose job is not written yet, printed output ``seq``."""
        if self._unrecorded is not None:
            self._unrecorded.output(seq)

    async def end_job(self, job: JobId | None, state: str, error: str | None = None, *,
                      released: bool = False) -> None:
        """The running cell ended ``state`` (``error`` says why); ``released``: the
        session was released meanwhile, and its cell's end is written already
        unless it completed."""
        unrecorded, self._unrecorded = self._unrecorded, None
        self._running_job = None
        if released and state != "completed":
            return
        if job is None:
            if unrecorded is not None:
                self._record_later(unrecorded, state, error)
            return
        await self._finish(job, state, error)

    async def release(self, state: str, error: str) -> None:
        """The session was released: its running cell's job ends ``state``."""
        if self._running_job is not None:
            await self._finish(self._running_job, state, error)
        if self._unrecorded is not None:
            self._record_later(self._unrecorded, state, error)
            self._unrecorded = None

    async def _finish(self, job: JobId, state: str, error: str | None) -> None:
        """Record how ``job`` ended: now, or once the database is back."""
        ended = time.time()
        try:
            await self.store.finish_job(job, state, error)
        except (DatabaseUnavailable, OSError) as exc:
            log.warning("session %s: job %s ended %s; the store records it when the database is back: %s",
                        self.session[:8], job, state, exc)
            self.journal.later(lambda: self.store.finish_job(job, state, error, ended), f"the end of job {job}")

    def _record_later(self, cell: UnrecordedCell, state: str, error: str | None) -> None:
        """The job of a cell that ran while the database was away, written once it is back."""
        self.flush()  # the tail the bound held goes in before the record that claims it
        record = cell.record(self.user, self.session, state, error)
        self.journal.later(lambda: self.store.record_cell(record),
                           f"the job of a cell of session {self.session[:8]} ({state})")
