"""The first messages of a connection, carried in its websocket upgrade request.

Over TLS a new connection costs three round trips before its first
message could even be sent (TCP, TLS, the websocket upgrade). A client
saves the one its hello and lease request would add by putting them in the
upgrade request itself: the header :data:`FIRST_MESSAGES` holds their
frames (:func:`~.framing.encode`), joined and base64-encoded
(:func:`first_messages`). A server that reads them there says so in its
``101`` answer (the same header, :data:`READ`), and reads them as the
connection's first frames, through the same reader and limits as any other
(:func:`first_frames`); the welcome and the lease then come back right
behind the ``101``. A server that does not answer :data:`READ` did not read
them: the client sends them as frames, as before.

No I/O. A header line has a limit (8 KiB in the websockets library):
messages whose header value would be longer than :data:`MAX_VALUE` (a
lease request for a notebook with a very long path) are not carried there.
"""

from __future__ import annotations

import base64
import binascii

from ..errors import ProtocolError
from .framing import encode
from .messages import Message

__all__ = ["FIRST_MESSAGES", "MAX_VALUE", "READ", "first_frames", "first_messages"]

#: The upgrade request's header with the first messages, and the 101's that says they were read.
FIRST_MESSAGES = "X-Remote-GPU-First-Messages"
#: The 101's value of :data:`FIRST_MESSAGES` from a server that read them.
READ = "read"
#: The longest header value a client sends (well under a header line's 8 KiB).
MAX_VALUE = 4096


def first_messages(messages: list[Message]) -> str | None:
    """The header value that carries ``messages``; None if it would be longer
    than :data:`MAX_VALUE` (then they go as frames)."""
    frames = [bytes(frame) for message in messages for frame in encode(message)]
    value = base64.b64encode(b"".join(frames)).decode("ascii")
    return value if len(value) <= MAX_VALUE else None


def first_frames(value: str) -> bytes:
    """The bytes of the messages a header value carries, for a protocol Reader;
    ProtocolError if it is not base64."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError(f"the {FIRST_MESSAGES} header is not base64") from None
