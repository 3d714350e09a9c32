"""Which browser pages may talk to the server: the ``Origin`` check.

A browser puts an ``Origin`` header on every websocket handshake and on
every cross-site or state-changing (``POST``) request; scripts, the Remote
GPU kernel, ``rgpu`` and the sidebar's server extension send none, and a
request without one is not checked here (its token is).

The server serves no web pages, so no page is its own: by default every
browser origin is refused. jupyter_server also allows a page whose origin
names the same host as the request's ``Host`` header; here that would let
in only a DNS-rebinding page (``evil.example`` made to resolve to this
server, whose ``Origin`` then matches ``Host``) and nothing legitimate.
``rgpu serve --allow-origin https://dash.example.com`` (repeatable) allows a
page's origin; ``--allow-origin '*'`` turns the check off.

Origins compare as ``scheme://host[:port]``, lower case, without the
scheme's default port. The check applies to websocket handshakes and to
every HTTP request alike; a refusal is a 403 whose one line names the
origin and the flag.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

__all__ = ["OriginPolicy", "normalize_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in canonical form, or None where ``origin`` is not one.

    ``null`` (a sandboxed page, a file) and anything with a path, query,
    user or fragment are not origins.
    """
    text = origin.strip().lower()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if (not parts.scheme or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username is not None):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        return f"{parts.scheme}://{host}:{port}"
    return f"{parts.scheme}://{host}"


class OriginPolicy:
    """The origins allowed to use this server; see the module docstring.

    Raises ValueError at construction for an entry that is not
    ``scheme://host[:port]`` or ``*``, so a typo stops ``rgpu serve``.
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.any = False
        self.allowed: frozenset[str] = frozenset()
        canonical: set[str] = set()
        for entry in allowed:
            if entry.strip() == "*":
                self.any = True
                continue
            origin = normalize_origin(entry)
            if origin is None:
                raise ValueError(f"--allow-origin {entry!r}: expected scheme://host[:port], "
                                 "like https://dash.example.com, or '*'")
            canonical.add(origin)
        self.allowed = frozenset(canonical)

    def refusal(self, origins: Sequence[str]) -> str | None:
        """Why a request with these ``Origin`` header values is refused; None: it may go on."""
        if not origins or self.any:
            return None
        if len(origins) > 1:
            return "a request may carry one Origin header, not several"
        origin = normalize_origin(origins[0])
        if origin is not None and origin in self.allowed:
            return None
        shown = "".join(c for c in origins[0][:200] if c.isprintable())
        return (f"origin {shown} may not use this GPU server: pages are refused unless the server "
                f"runs with --allow-origin {origin or shown}")
