"""What a remote cell returns, and how its output and notices reach the user
by default: shared by the asyncio session (:mod:`.session`), the blocking
one (:mod:`.sync`) and the kernel."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from remote_gpu_core.errors import RemoteError
from remote_gpu_core.protocol import messages as m

__all__ = ["PARENT_FIELDS", "ExecuteResult", "NoticeCallback", "QueueCallback", "notify", "parent_of",
           "write_streams"]

NoticeCallback = Callable[[str], Any]
QueueCallback = Callable[[int], Any]

#: The fields of a Jupyter request header that travel as a request's parent.
PARENT_FIELDS = ("msg_id", "session", "username", "date", "msg_type", "version")


def parent_of(header: dict[str, Any] | None) -> dict[str, Any]:
    """The request-header fields a remote request carries (see :class:`~m.Execute`)."""
    if not header:
        return {}
    return {k: str(header[k]) for k in PARENT_FIELDS if header.get(k) is not None}


@dataclasses.dataclass
class ExecuteResult:
    """What a cell did: ``status`` is ``ok``, ``error`` or ``aborted``;
    ``values``: the variables :meth:`AsyncSession.run` pulled after it."""

    status: str
    job: int
    execution_count: int | None
    outputs: list[m.Output]
    error: RemoteError | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def stdout(self) -> str:
        return "".join(o.content.get("text", "") for o in self.outputs
                       if o.msg_type == "stream" and o.content.get("name") == "stdout")


def write_streams(msg: m.Output) -> None:
    """The default output handler: stream text to the local stdout/stderr."""
    if msg.msg_type == "stream":
        stream = sys.stderr if msg.content.get("name") == "stderr" else sys.stdout
        stream.write(msg.content.get("text", ""))
        stream.flush()


def notify(on_notice: NoticeCallback | None, text: str) -> None:
    """Tell the user ``text``: through ``on_notice``, else on stderr."""
    if on_notice is not None:
        on_notice(text)
    else:
        print(f"[remote-gpu] {text}", file=sys.stderr)
