"""A receiver's limits on message sizes, checked before sending; no I/O.

A server names its limits in :class:`~.messages.Welcome` (``limits``):
``max_push``, the buffers of one push (they stream through the server),
``max_upload``, the files of one upload (the same way), and
``max_message``, any other message whole and a push's header. A client
calls :func:`refusal` before sending a message, so that one the server
would refuse fails at once with a one-line :class:`MessageTooLarge` and
nothing of it is sent (the session goes on).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import MessageTooLarge
from ..sizes import format_size
from .framing import header_bytes, views
from .messages import Execute, Message, Push, Upload

__all__ = ["measure", "refusal"]


def measure(message: Message) -> tuple[int, int]:
    """``(header, buffers)``: the bytes of ``message``'s JSON header and of its buffers."""
    lengths = [sum(p.nbytes for p in views(b)) for b in getattr(message, "buffers", ())]
    return len(header_bytes(message, lengths)), sum(lengths)


def refusal(message: Message, limits: Mapping[str, int]) -> MessageTooLarge | None:
    """Why a receiver with ``limits`` would refuse ``message``; None if it fits."""
    header, buffers = measure(message)
    max_push, max_message = limits.get("max_push"), limits.get("max_message")
    if isinstance(message, Push):
        if max_push is not None and buffers > max_push:
            return MessageTooLarge(
                f"this push is {format_size(buffers)}, more than the GPU server takes in one push "
                f"({format_size(max_push)}, its --max-push): push the variables in smaller groups",
                size=buffers, limit=max_push, what="push")
        buffers = 0  # a push's buffers stream through; only its header must fit a message
    elif isinstance(message, Upload):
        max_upload = limits.get("max_upload")
        if max_upload is not None and buffers > max_upload:
            return MessageTooLarge(
                f"the upload of {format_size(buffers)} is over the GPU server's limit of "
                f"{format_size(max_upload)} per upload (its --max-upload); nothing was sent",
                size=buffers, limit=max_upload, what="upload")
        buffers = 0
    if max_message is not None and header + buffers > max_message:
        what = "cell" if isinstance(message, Execute) else f"{message.type.value} message"
        return MessageTooLarge(
            f"this {what} is {format_size(header + buffers)}, more than the GPU server takes in "
            f"one message ({format_size(max_message)}, its --max-message); send large data as "
            "pushed variables", size=header + buffers, limit=max_message, what=message.type.value)
    return None
