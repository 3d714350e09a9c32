"""Remote comms (widgets) in the local kernel that runs ``%%gpu`` cells.

A widget made in a ``%%gpu`` cell lives on the GPU worker, but the notebook
talks only to the local kernel. :class:`CommBridge` joins the two:

* the remote ``comm_open``/``comm_msg``/``comm_close`` messages are
  published on the local kernel's IOPub whole (content, metadata such as the
  widget protocol ``version``, buffers), under the local request they
  belong to;
* for each remote comm a proxy comm (``comm``'s ``BaseComm`` with
  ``primary=False``, so it opens nothing itself) is registered in the local
  kernel's comm manager; what the notebook sends to it goes to the worker
  as a shell request under the notebook's own ``msg_id``, and what the
  worker publishes meanwhile (a widget's echo, a callback's prints) is
  shown here;
* remote cells run under the local cell's ``msg_id`` (see
  :meth:`~remote_gpu_kernel.AsyncSession.execute`), so an
  ``ipywidgets.Output`` made remotely captures output as a local one does.

A widget whose worker is gone (released, died) answers the notebook with
one error that says so and is drawn as disconnected, so a widget never
waits on a worker that cannot answer.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable
from typing import Any

from remote_gpu_core.errors import RemoteGpuError
from remote_gpu_core.protocol.messages import Output

from . import notices

__all__ = ["COMM_MESSAGES", "CommBridge"]

log = logging.getLogger("remote_gpu_kernel")

COMM_MESSAGES = frozenset({"comm_open", "comm_msg", "comm_close"})
#: How many recent request headers are kept to place background output.
PARENTS_KEPT = 256


class CommBridge:
    """The proxies of one IPython kernel; see the module docstring.

    ``session`` returns the current remote session (or None); ``render``
    shows a non-comm output message in the current cell.
    """

    def __init__(self, shell: Any, session: Callable[[], Any], render: Callable[[Output], None]) -> None:
        self.shell = shell
        self._session = session
        self._render = render
        self._proxies: dict[str, Any] = {}
        self._sessions: dict[str, str] = {}  # comm id -> the id of the session that made it
        self._parents: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    @property
    def kernel(self) -> Any:
        return getattr(self.shell, "kernel", None)

    # -- parents -------------------------------------------------------------

    def current_parent(self) -> dict[str, Any]:
        """The local request being handled (the ``%%gpu`` cell, a widget's message)."""
        kernel = self.kernel
        parent = kernel.get_parent("shell") if kernel is not None else None
        if parent and parent.get("header"):
            self.remember(parent)
            return dict(parent)
        return {}

    def remember(self, parent: dict[str, Any]) -> None:
        msg_id = parent.get("header", {}).get("msg_id")
        if msg_id:
            self._parents[msg_id] = parent
            self._parents.move_to_end(msg_id)
            while len(self._parents) > PARENTS_KEPT:
                self._parents.popitem(last=False)

    # -- from the worker -------------------------------------------------------

    def show(self, msg: Output) -> None:
        """An output of the running cell or widget message (main thread)."""
        if msg.msg_type in COMM_MESSAGES:
            self._publish_comm(msg, self.current_parent())
        else:
            self._render(msg)

    def background(self, msg: Output) -> None:
        """An output that answers no running request (the I/O thread): it is
        published under the local request whose ``msg_id`` it names."""
        parent = self._parents.get(msg.parent) or ({"header": {"msg_id": msg.parent}} if msg.parent else {})
        if msg.msg_type in COMM_MESSAGES:
            self._publish_comm(msg, parent)
        elif msg.msg_type in ("stream", "display_data", "update_display_data", "clear_output", "error"):
            self._publish(msg.msg_type, msg.content, parent, msg.metadata, msg.buffers)

    def _publish(self, msg_type: str, content: dict[str, Any], parent: dict[str, Any],
                 metadata: dict[str, Any] | None = None, buffers: Any = None) -> None:
        kernel = self.kernel
        if kernel is None:
            return
        topic = kernel._topic(msg_type) if hasattr(kernel, "_topic") else msg_type.encode()
        kernel.session.send(kernel.iopub_socket, msg_type, content, parent=parent or None,
                            metadata=metadata or {}, buffers=[bytes(b) for b in buffers] if buffers else None,
                            ident=topic)

    def _publish_comm(self, msg: Output, parent: dict[str, Any]) -> None:
        # Streams written before this message must reach the notebook first:
        # an Output widget's msg_id is set and reset by comm messages.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        comm_id = str(msg.content.get("comm_id", ""))
        if msg.msg_type == "comm_open":
            self._open_proxy(comm_id, msg.content)
        self._publish(msg.msg_type, msg.content, parent, msg.metadata, msg.buffers)
        if msg.msg_type == "comm_close":
            self._drop_proxy(comm_id)

    # -- proxies -------------------------------------------------------------

    def _open_proxy(self, comm_id: str, content: dict[str, Any]) -> None:
        from comm import create_comm, get_comm_manager

        if comm_id in self._proxies:
            return
        proxy = create_comm(comm_id=comm_id, primary=False, target_name=content.get("target_name", ""),
                            target_module=content.get("target_module"))
        proxy.on_msg(self._from_notebook)
        proxy.on_close(self._from_notebook)
        get_comm_manager().register_comm(proxy)
        self._proxies[comm_id] = proxy
        session = self._session()
        self._sessions[comm_id] = session.id if session is not None else ""

    def _drop_proxy(self, comm_id: str) -> None:
        from comm import get_comm_manager

        proxy = self._proxies.pop(comm_id, None)
        self._sessions.pop(comm_id, None)
        if proxy is not None:
            proxy._closed = True  # closed by the worker: nothing to send back
            manager = get_comm_manager()
            registered = manager.get_comm(comm_id)
            if registered is not None and registered is proxy:
                manager.unregister_comm(registered)

    def _from_notebook(self, msg: dict[str, Any]) -> None:
        """A message from the notebook to a proxy: forward it to the worker."""
        msg_type = msg["header"]["msg_type"]
        content = dict(msg["content"])
        comm_id = str(content.get("comm_id", ""))
        parent = self.current_parent() or msg
        self.remember(msg)
        made_by = self._sessions.get(comm_id)
        if msg_type == "comm_close":
            self._drop_proxy(comm_id)
        session = self._session()
        if session is None or session.released or session.id != made_by:
            if msg_type != "comm_close":
                self._dead(comm_id, parent, "the GPU session that made it was released, and its "
                                            "worker and variables with it: run its cell again")
            return
        buffers = tuple(bytes(b) for b in msg.get("buffers") or ())
        try:
            session.shell_request(msg_type, content, buffers=buffers, on_output=self.show,
                                  parent=msg["header"])
        except RemoteGpuError as exc:
            if msg_type != "comm_close":
                self._dead(comm_id, parent, str(exc))

    def _dead(self, comm_id: str, parent: dict[str, Any], why: str) -> None:
        """Tell the notebook the widget cannot work any more: an error under the
        message that touched it, and the widget drawn as disconnected."""
        self._publish("error", {"ename": "WidgetGone", "evalue": why,
                                "traceback": [notices.widget_gone(why)]}, parent)
        self._publish("comm_msg", {"comm_id": comm_id, "data": notices.gone_state(why)}, parent)
