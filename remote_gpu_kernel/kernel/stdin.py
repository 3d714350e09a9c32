"""A remote ``input()`` answered by the notebook, on the kernel's stdin channel.

The worker's ``input_request`` reaches the kernel as an output of the cell;
:class:`FrontendInput` asks the notebook the same question on the kernel's
own stdin socket, under the notebook's request, and returns its answer,
which the kernel sends back to the worker.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.session import Session

__all__ = ["FrontendInput"]


class FrontendInput:
    """The kernel's stdin socket (ZMQ ROUTER), read on the kernel's event loop."""

    def __init__(self, session: Session, socket: Any) -> None:
        self._session = session
        self._socket = socket
        self._async: Any = None

    async def ask(self, prompt: str, password: bool, parent: dict[str, Any], ident: Any) -> str:
        """The notebook's answer to ``prompt``, as a reply to its request ``parent``."""
        import zmq
        import zmq.asyncio

        if self._async is None:
            self._async = zmq.asyncio.Socket.from_socket(self._socket)
        while True:  # stale replies of earlier, interrupted requests
            try:
                self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        self._session.send(self._socket, "input_request", {"prompt": prompt, "password": password},
                           parent, ident=ident)
        while True:
            frames = await self._async.recv_multipart()
            _, msg_list = self._session.feed_identities(frames)
            reply = self._session.deserialize(msg_list)
            if reply["msg_type"] == "input_reply":
                return str(reply["content"].get("value", ""))
