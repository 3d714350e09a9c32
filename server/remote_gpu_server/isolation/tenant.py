"""Who a leased worker works for: the lease's user and its session folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .identities import Identity

__all__ = ["Tenant"]


@dataclasses.dataclass(frozen=True)
class Tenant:
    """The user a leased worker works for, and the lease's session folder.

    ``identity`` is who the user's code runs as (None: the server's user).
    """

    user: str
    folder: Path
    identity: Identity | None = None
