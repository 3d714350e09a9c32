"""Show a remote output message in the local notebook, as if produced here.

Streams go to the local ``sys.stdout``/``sys.stderr`` (in a kernel those
are its IOPub streams), rich outputs through IPython's display publisher,
so images, HTML and ``update_display_data`` behave as they do locally.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import cast

from remote_gpu_core.protocol.messages import Output

__all__ = ["render_output"]


def render_output(msg: Output) -> None:
    """Render one remote output message; message types with no local view are skipped."""
    from IPython import display

    # IPython leaves these two unannotated; these are their types.
    publish_display_data = cast(Callable[..., None], display.publish_display_data)
    clear_output = cast(Callable[..., None], display.clear_output)
    content = msg.content
    kind = msg.msg_type
    if kind == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif kind in ("display_data", "execute_result"):
        publish_display_data(content.get("data", {}), content.get("metadata") or {},
                             transient=content.get("transient") or None)
    elif kind == "update_display_data":
        publish_display_data(content.get("data", {}), content.get("metadata") or {},
                             transient=content.get("transient") or None, update=True)
    elif kind == "clear_output":
        sys.stdout.flush()
        sys.stderr.flush()
        clear_output(wait=bool(content.get("wait")))
