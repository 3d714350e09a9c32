"""The sidebar's one error, in the project's tree (:mod:`remote_gpu_core.errors`)::

    RemoteGpuError                    (remote_gpu_core.errors)
    └── GpuApiError                   code: its reason, one of bad-url, no-token,
                                      unreachable, unauthorized, not-found,
                                      conflict, server-error

Every failure to reach or use the GPU server's HTTP API becomes a
:class:`GpuApiError` (see :mod:`.gpu_api`), which the handlers answer as
JSON for the front end to show.
"""

from __future__ import annotations

import dataclasses

from remote_gpu_core.errors import RemoteGpuError

__all__ = ["GpuApiError"]


@dataclasses.dataclass
class GpuApiError(RemoteGpuError):
    """A failure to show to the user: ``reason`` is a stable code for the front end.

    Reasons: ``bad-url``, ``no-token``, ``unreachable``, ``unauthorized``,
    ``not-found``, ``conflict``, ``server-error``.
    """

    status: int
    reason: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return self.message

    @property
    def code(self) -> str:
        """The stable code every error of the tree has: here, the reason."""
        return self.reason

    def to_json(self, url: str) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "hint": self.hint, "url": url}
