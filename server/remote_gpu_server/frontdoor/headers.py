"""Reading a handshake's headers strictly: each one the server acts on may come once.

The websockets library keeps every header as sent; ``headers.get`` raises
``MultipleValuesError`` for one that came twice. A request with two
``Authorization`` or ``Upgrade`` headers is a client's mistake or a probe,
and gets a 400 that says so (:class:`HeaderError`), never a 500 or a guess at
which one was meant.
"""

from __future__ import annotations

from websockets.http11 import Request

from ..errors import HeaderError

__all__ = ["HeaderError", "bearer_token", "is_websocket", "single_header"]


def single_header(request: Request, name: str) -> str | None:
    """The value of header ``name``, None if absent; HeaderError if repeated."""
    values = request.headers.get_all(name)
    if len(values) > 1:
        raise HeaderError(f"a request may carry one {name} header, not {len(values)}")
    return values[0] if values else None


def is_websocket(request: Request) -> bool:
    """Whether ``request`` asks for a websocket (``Upgrade: websocket``)."""
    return "websocket" in (single_header(request, "Upgrade") or "").lower()


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``, None if there is none."""
    scheme, _, token = (single_header(request, "Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
