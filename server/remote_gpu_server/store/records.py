"""What the store returns: frozen records, and the job states.

No I/O here; :mod:`.base` turns rows into these records.
"""

from __future__ import annotations

import dataclasses
import enum

from remote_gpu_core.ids import JobId, SessionId

__all__ = ["AttemptRecord", "BatchSpec", "CellRecord", "JOB_STATES", "JobRecord", "JobState", "OutputRow",
           "SessionRecord", "TokenInfo", "slot_count"]


class JobState(str, enum.Enum):
    """A job's state; the values are what the store and the HTTP API hold."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def ended(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


JOB_STATES: tuple[str, ...] = tuple(state.value for state in JobState)


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    admin: bool
    created: float
    expires: float | None
    revoked: float | None
    last_used: float | None
    #: Quotas set on this token; None: the server's defaults.
    max_gpus: int | None = None
    max_waiting: int | None = None


@dataclasses.dataclass(frozen=True)
class JobRecord:
    id: JobId
    user: str
    session: SessionId | None
    kind: str
    slots: str
    code: str
    state: str
    error: str | None
    created: float
    started: float | None
    ended: float | None
    #: The notebook (or script) the job came from, when its client said.
    notebook: str | None = None


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """A lease as the store keeps it (open until ``released``)."""

    id: SessionId
    user: str
    slots: str
    created: float
    notebook: str | None = None


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a batch job asked for; ``attempt`` counts the attempts started so far."""

    id: JobId
    name: str
    gpus: int
    priority: str
    pool: str | None
    timeout: float | None
    retries: int
    attempt: int
    #: The Python environment it runs in (see remote_gpu_server.environments).
    env: str = "default"


@dataclasses.dataclass(frozen=True)
class AttemptRecord:
    """One run of a batch job on its own lease."""

    job: JobId
    attempt: int
    session: SessionId | None
    slots: str
    started: float
    ended: float | None
    state: str
    error: str | None


@dataclasses.dataclass(frozen=True)
class OutputRow:
    """One journaled output message of a session (``job`` None: not from a cell)."""

    session: SessionId
    seq: int
    job: JobId | None
    msg_type: str
    content: dict[str, object]


@dataclasses.dataclass(frozen=True)
class CellRecord:
    """A cell that ran while the database was away, for its job to be written
    after the fact: what, where and when it ran, how it ended, and the
    journal's sequence numbers of its outputs as runs ``(first, last)``."""

    user: str
    session: SessionId
    code: str
    slots: tuple[str, ...]
    started: float
    ended: float
    state: str
    error: str | None
    outputs: tuple[tuple[int, int], ...]


def slot_count(slots: str) -> int:
    """How many slots a stored comma-separated slot list names."""
    return len([s for s in slots.split(",") if s])
