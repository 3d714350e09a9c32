"""The ways a server can isolate its workers (see :mod:`.policy` for how one is chosen)."""

from __future__ import annotations

import enum

__all__ = ["IsolationMode"]


class IsolationMode(enum.Enum):
    """How a server isolates its workers.

    ``UIDS``: a root server's workers run as their users' own uids, in mount
    and IPC namespaces of their own; ``BUBBLEWRAP``: each worker in a
    bubblewrap sandbox; ``NONE``: as the server's own user.
    """

    UIDS = "uids"
    BUBBLEWRAP = "bubblewrap"
    NONE = "none"
