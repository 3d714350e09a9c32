"""The notebook's comm messages (widgets), forwarded to the worker's comms.

A widget made by a remote cell lives on the GPU worker. The notebook's
``comm_open``, ``comm_msg`` and ``comm_close`` for it go to the worker as
shell requests under the notebook's own request, and what the worker
publishes meanwhile (a widget's echo, a callback's prints) comes back under
that request. :attr:`CommForwarder.ids` are the comms open between the two,
as seen passing either way (:class:`~.output.CellOutput` adds the worker's
``comm_open``). A comm the worker does not have (closed, or its worker died,
was released or parked) is answered with an error that says so, and the
widget drawn as disconnected, so that a widget never waits on a worker that
cannot answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from remote_gpu_core.errors import RemoteGpuError

from .. import notices
from ..session import AsyncSession
from .lease import RemoteLease
from .output import CellOutput

__all__ = ["CommForwarder"]

#: The leased session for a request, or the error reply of one that could not get it.
Lease = Callable[[CellOutput], Awaitable[AsyncSession | dict[str, Any]]]


class CommForwarder:
    """See the module docstring. ``lease`` reconnects a session whose
    connection dropped; ``log`` is the kernel's."""

    def __init__(self, remote: RemoteLease, lease: Lease, log: logging.Logger) -> None:
        self.remote = remote
        self._lease = lease
        self.log = log
        #: The comms open between the notebook and the worker, as seen passing.
        self.ids: set[str] = set()

    async def info(self, content: dict[str, Any]) -> dict[str, Any]:
        """The ``comm_info_reply`` content: the worker's comms; none without a
        connected session, or for a parked one."""
        reply: dict[str, Any] = {"comms": {}, "status": "ok"}
        session = self.remote.usable
        if session is not None and not session.parked:
            try:
                reply = (await session.shell_request("comm_info_request", content)).content
            except RemoteGpuError:
                self.log.warning("comm_info_request failed", exc_info=True)
        return reply

    async def forward(self, msg_type: str, content: dict[str, Any], cell: CellOutput,
                      parent: dict[str, Any]) -> None:
        """Forward the notebook's comm message ``parent`` to the worker."""
        comm_id = str(content.get("comm_id", ""))
        if msg_type != "comm_open" and comm_id not in self.ids:
            # Never open here (refused at its comm_open, or closed): dropped,
            # as ipykernel drops a message for a comm it does not have.
            self.log.warning("%s for comm %s, which is not open; dropped", msg_type, comm_id)
            return
        if msg_type == "comm_close":
            self.ids.discard(comm_id)
        session = self.remote.usable
        if session is None and self.remote.session is not None and not self.remote.session.released:
            reconnected = await self._lease(cell)  # the connection dropped: resume it
            session = None if isinstance(reconnected, dict) else reconnected
        if session is not None and session.parked:  # a parked session's comms ended with its worker
            if msg_type == "comm_open":
                cell.send("comm_close", {"comm_id": content.get("comm_id"), "data": {}})
            elif msg_type == "comm_msg":
                self._gone(cell, content, "the GPU session that made it was parked, and its "
                           "worker with it: run its cell again")
            return
        if session is None:
            if msg_type == "comm_open":  # as ipykernel answers an unknown target
                cell.send("comm_close", {"comm_id": content.get("comm_id"), "data": {}})
            elif msg_type == "comm_msg":
                self._gone(cell, content, "the GPU session that made it was released, and "
                           "its worker and variables with it: run its cell again")
            return
        buffers = tuple(bytes(b) for b in parent.get("buffers") or ())
        if msg_type == "comm_open":
            self.ids.add(comm_id)  # until the worker closes it (no such target)
        try:
            await session.shell_request(msg_type, content, buffers=buffers, on_output=cell.forward,
                                        parent=cell.header)
        except RemoteGpuError as exc:
            if msg_type == "comm_msg":
                self._gone(cell, content, str(exc))
            else:
                self.ids.discard(comm_id)
                self.log.warning("could not forward %s to the GPU worker: %s", msg_type, exc)

    def _gone(self, cell: CellOutput, content: dict[str, Any], why: str) -> None:
        """Say why a widget no longer answers: an error under the message that
        touched it (JupyterLab shows it in the log console), and the widget
        drawn as ipywidgets draws one without a kernel (see :func:`~remote_gpu_kernel.notices.gone_state`)."""
        cell.error("WidgetGone", why, [notices.widget_gone(why)])
        cell.send("comm_msg", {"comm_id": content.get("comm_id"), "data": notices.gone_state(why)})
