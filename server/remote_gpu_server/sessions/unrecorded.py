"""A cell that runs while the database is away, and what its job record needs.

A cell's job row is written as the cell starts. Where the store cannot
take it (PostgreSQL is restarting), the cell runs anyway, and an
:class:`UnrecordedCell` keeps what the row needs: the code, the slots, when
it started, and the journal's sequence numbers of its outputs (journaled
with no job). When the cell ends, :meth:`UnrecordedCell.record` makes the
:class:`~.store.CellRecord` that the session hands to the journal
(:meth:`~.journal.Journal.later`), which writes it once the database is
back, after the outputs: the job then appears in its user's history with
its own times, end, output and GPU time.
"""

from __future__ import annotations

import dataclasses
import time

from remote_gpu_core.ids import SessionId

from ..store import CellRecord

__all__ = ["UnrecordedCell"]


@dataclasses.dataclass
class UnrecordedCell:
    """A running cell without a job row; :meth:`output` each journaled output."""

    code: str
    slots: tuple[str, ...]
    started: float = dataclasses.field(default_factory=time.time)
    _outputs: list[list[int]] = dataclasses.field(default_factory=list)  # runs [first, last]

    def output(self, seq: int) -> None:
        """The cell's output ``seq`` was journaled (sequence numbers only grow)."""
        if self._outputs and self._outputs[-1][1] == seq - 1:
            self._outputs[-1][1] = seq
        else:
            self._outputs.append([seq, seq])

    def record(self, user: str, session: SessionId, state: str, error: str | None) -> CellRecord:
        """The cell's job as it ended now, ``state`` and ``error``."""
        return CellRecord(user, session, self.code, self.slots, self.started, time.time(), state, error,
                          tuple((first, last) for first, last in self._outputs))
