"""What parking is configured with, and what a parked session holds.

Plain frozen data, no I/O; :mod:`.parking` does the work and
:class:`~.session.Session` keeps a :class:`ParkedState` while it is parked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ..isolation.user_sites import DEFAULT_ENVIRONMENT
from ..isolation.tenant import Tenant

__all__ = ["PARK_FOLDER", "ParkConfig", "ParkedState"]

#: Where, inside a session folder, a parked namespace is saved.
PARK_FOLDER = ".rgpu-parked"


@dataclasses.dataclass(frozen=True)
class ParkConfig:
    """The ``rgpu serve`` flags of parking."""

    #: ``--park-after``: park a session idle for this many seconds (a pool's
    #: ``park-after`` overrides it); None: only when asked (``%gpu park``).
    park_after: float | None = None
    #: ``--park-quota``: bytes of parked files each user may hold; None: no limit.
    quota: int | None = None
    #: ``--park-keep``: seconds a parked session is kept before it is released.
    keep: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.park_after is not None and not self.park_after > 0:
            raise ValueError(f"--park-after needs a number of seconds above 0, not {self.park_after}")
        if self.quota is not None and self.quota < 0:
            raise ValueError(f"--park-quota must be 0 or more, not {self.quota}")
        if not self.keep > 0:
            raise ValueError(f"--park-keep needs a number of days above 0, not {self.keep / 86400:g}")


@dataclasses.dataclass(frozen=True)
class ParkedState:
    """A parked session: where its namespace is and what resuming it asks for."""

    #: The lease's user and session folder (the files are in its PARK_FOLDER).
    tenant: Tenant
    #: What the lease that resumes it asks for: the same pool, size and priority.
    pool: str
    gpus: int
    priority: str
    names: tuple[str, ...]
    #: Names that could not be saved, and why.
    unsaved: Mapping[str, str]
    #: Bytes of the session folder's files, the saved namespace and what the
    #: session wrote there (what counts against ``--park-quota``).
    nbytes: int
    #: When it was parked (epoch seconds) and why.
    parked_at: float
    reason: str
    #: How many leases the session held before this park.
    segment: int = 0
    #: The environment it resumes in (not kept in the store: a server restart resumes it in the default).
    environment: str = DEFAULT_ENVIRONMENT

    @property
    def folder(self) -> Path:
        return self.tenant.folder / PARK_FOLDER

