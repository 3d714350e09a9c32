"""How a connection refuses a request: the answers it owes, and what a
refusal for size says.

A refused request is answered with a short ``Error`` without the
connection waiting for its client to read it: the answers queue in a
:class:`RefusalQueue` of at most :data:`MAX_REFUSALS`, and a client that
lets more pile up is disconnected. A message refused for its size is
answered with the ``rgpu serve`` flag whose limit it is over
(:func:`too_large_text`); where the connection must close over it, the
close reason says the same in short (:func:`too_large_reason`). An error
a request's handler raised is answered with its code (:func:`wire_code`).
A hello of another protocol version, or a cell with a timeout that is no
number of seconds, is refused with what to do (:func:`hello_refusal`,
:func:`execute_refusal`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable

from remote_gpu_core.errors import MessageTooLarge, RemoteGpuError
from remote_gpu_core.protocol import PROTOCOL_VERSION
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.sizes import format_size

from .limits import Limits

__all__ = ["MAX_REFUSALS", "RefusalQueue", "execute_refusal", "hello_refusal", "too_large_code", "too_large_reason",
           "too_large_text", "wire_code"]

#: Refusals that may wait for the client to read them (each a short Error);
#: a client that lets more pile up is disconnected.
MAX_REFUSALS = 1024
#: The names of the protocol's message types.
_MESSAGE_TYPES = frozenset(t.value for t in m.MessageType)


class RefusalQueue:
    """The refusals one connection owes its client, sent in order by ``send``
    by a task of their own; see the module docstring."""

    def __init__(self, send: Callable[[m.Message], Awaitable[None]]) -> None:
        self._send = send
        self._queue: collections.deque[m.Error] = collections.deque()
        self._sending: asyncio.Task[None] | None = None

    def add(self, error: m.Error) -> bool:
        """Queue ``error`` to be sent; False (and nothing queued) if
        :data:`MAX_REFUSALS` are still unread: disconnect the client."""
        if len(self._queue) >= MAX_REFUSALS:
            return False
        self._queue.append(error)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send_all())
        return True

    async def _send_all(self) -> None:
        while self._queue:  # cleared when the connection ends
            await self._send(self._queue.popleft())

    def clear(self) -> None:
        """The connection ended: nothing more is sent."""
        self._queue.clear()


def too_large_code(exc: MessageTooLarge) -> m.ErrorCode:
    """How a message refused for its size is answered: an upload as a file
    error (the client's FileTransferError), anything else as a bad request."""
    return m.ErrorCode.FILE if exc.what == "upload" else m.ErrorCode.BAD_REQUEST


def _flag(limits: Limits, exc: MessageTooLarge) -> str | None:
    """The ``rgpu serve`` flag whose limit ``exc`` is over, if one is."""
    if exc.what == "push" and exc.limit == limits.max_push:
        return "--max-push"
    if exc.what == "upload" and exc.limit == limits.max_upload:
        return "--max-upload"
    if exc.limit == limits.max_message:
        return "--max-message"
    return None


def too_large_text(limits: Limits, exc: MessageTooLarge) -> str:
    """The answer to a message refused for its size: what, and what to do."""
    flag = _flag(limits, exc)
    if flag == "--max-push":
        return limits.push_refusal(exc.size)
    if flag == "--max-upload":
        return limits.upload_refusal(exc.size)
    if flag == "--max-message":
        return limits.message_refusal(exc.what or "", exc.size)
    return f"message refused: {exc}"


def too_large_reason(limits: Limits, exc: MessageTooLarge) -> str:
    """A close reason for ``exc``: short (a websocket's reason is at most 123 bytes)."""
    flag = _flag(limits, exc)
    # The type comes from the client: only a known one is repeated.
    what = exc.what if exc.what in _MESSAGE_TYPES else "message"
    if flag is None:
        return f"{what} over this server's limits"
    return f"{what} of {format_size(exc.size)} over rgpu serve {flag} ({format_size(exc.limit)})"


def wire_code(exc: RemoteGpuError) -> m.ErrorCode:
    """The protocol's code for an error of the tree: its own where the protocol
    has it, else ``internal``."""
    try:
        return m.ErrorCode(exc.code)
    except ValueError:
        return m.ErrorCode.INTERNAL


def hello_refusal(msg: m.Hello) -> str | None:
    """Why a client's hello is refused (it speaks another protocol version); None if it is not."""
    if msg.protocol == PROTOCOL_VERSION:
        return None
    return (f"protocol version mismatch: the client speaks {msg.protocol}, this server speaks "
            f"{PROTOCOL_VERSION}; install the same remote-gpu-kernel version on both sides")


def execute_refusal(msg: m.Execute) -> str | None:
    """Why a cell is refused before it runs (a timeout that is not above 0); None if it is not."""
    if msg.timeout is not None and not msg.timeout > 0:
        return "a cell's timeout is a number of seconds above 0"
    return None
