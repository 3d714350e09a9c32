"""What the ``%%gpu`` magic and the Remote GPU kernel tell the user, in the same words.

Information (the place in the queue, the lease, a file transfer's progress)
is one line of ``text/plain`` shown as ``display_data`` and updated in place
(:class:`StatusLine`), never as stderr, which notebooks paint as an error.
Warnings that the user must act on (the session was lost, its variables are
gone) go to stderr with the same ``Remote GPU:`` prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

from remote_gpu_core.sizes import format_size

__all__ = [
    "ENV_MAGIC",
    "PREFIX",
    "PROGRESS_FROM",
    "StatusLine",
    "env_code",
    "gone_state",
    "publish_display",
    "granted",
    "queued",
    "restoring",
    "resumed",
    "resumed_parked",
    "transferred",
    "versions_differ",
    "widget_gone",
]

PREFIX = "Remote GPU: "
#: Transfers of at least this many bytes show their progress while they run (see :mod:`.progress`).
PROGRESS_FROM = 8 << 20

#: ``publish(msg_type, content)`` sends one display message for the line.
Publish = Callable[[str, dict[str, Any]], None]


def queued(position: int) -> str:
    return f"{PREFIX}waiting for a GPU, number {position} in the queue"


def restoring(position: int) -> str:
    return f"{PREFIX}waiting for a GPU to restore the parked session, number {position} in the queue"


def granted(slots: Sequence[str], url: str, session_id: str, waited: float, user: str | None = None,
            mismatch: str | None = None) -> str:
    """The lease line; ``mismatch`` (what differs between the versions on
    both ends, see :mod:`.versions`) is a second line where there is one."""
    who = f" as {user}" if user else ""
    wait = f", waited {waited:.1f} s" if waited >= 0.1 else ""
    line = f"{PREFIX}leased {', '.join(slots)} from {url}{who} (session {session_id[:8]}{wait})"
    return f"{line}\n{versions_differ(mismatch)}" if mismatch else line


def versions_differ(mismatch: str) -> str:
    """``Remote GPU: numpy 2.1.3 here, 1.26.4 on the GPU server``: one line."""
    return f"{PREFIX}{mismatch}"


def resumed(slots: Sequence[str], session_id: str) -> str:
    return f"{PREFIX}reconnected to session {session_id[:8]} on {', '.join(slots)}; its variables are kept"


def resumed_parked(session_id: str, restorer: str) -> str:
    """``restorer``: which cell restores it ("this cell", "the next %%gpu cell")."""
    return f"{PREFIX}reconnected to parked session {session_id[:8]}; {restorer} restores it"


def transferred(verb: str, files: Sequence[tuple[str, int]]) -> str:
    """``Remote GPU: uploaded images/x.png (1.2 MiB)`` or a summary for many files."""
    total = sum(size for _, size in files)
    if len(files) == 1:
        (name, size), = files
        return f"{PREFIX}{verb} {name} ({format_size(size)})"
    shown = ", ".join(f"{name} ({format_size(size)})" for name, size in files[:3])
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f"{PREFIX}{verb} {len(files)} files, {format_size(total)}: {shown}{more}"


def widget_gone(why: str) -> str:
    """``Remote GPU: this widget no longer works: WHY``: a widget whose worker is gone."""
    return f"{PREFIX}this widget no longer works: {why}"


def gone_state(why: str) -> dict[str, Any]:
    """A widget update that draws the widget as ipywidgets draws one whose
    kernel is gone (its ``jupyter-widgets-disconnected`` class: faded, a
    red broken-link mark), disabled, with ``why`` as its tooltip."""
    return {"method": "update", "buffer_paths": [],
            "state": {"_dom_classes": ["jupyter-widgets-disconnected"], "disabled": True,
                      "tooltip": widget_gone(why)}}


def publish_display(msg_type: str, content: dict[str, Any]) -> None:
    """A :class:`StatusLine` message through IPython's display publisher (the
    cell that runs now, in a kernel where IPython runs the cells)."""
    from IPython import display

    publish_display_data = cast(Callable[..., None], display.publish_display_data)  # unannotated
    publish_display_data(content["data"], content.get("metadata") or {},
                         transient=content.get("transient"), update=msg_type == "update_display_data")


class StatusLine:
    """One line of information, shown once and then updated in place."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._display_id = f"rgpu-{uuid.uuid4().hex}"
        self._shown = False

    def show(self, text: str) -> None:
        content = {"data": {"text/plain": text}, "metadata": {},
                   "transient": {"display_id": self._display_id}}
        self._publish("update_display_data" if self._shown else "display_data", content)
        self._shown = True


#: The worker's magic behind ``%gpu env`` (the server's ``worker_process/user_site.py``).
ENV_MAGIC = "rgpu_env"


def env_code(action: str) -> str:
    """The remote cell that does ``%gpu env ACTION``: ``show`` or ``reset`` the
    packages the user installed in their own site on the server."""
    return f"%{ENV_MAGIC} {action}"
