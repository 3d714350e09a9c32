"""The client side of TLS: which connections are safe, and how to verify the server.

Every client of the GPU server calls these before it connects: the asyncio
client (and so :class:`~remote_gpu_kernel.Client`, ``%%gpu`` and the Remote
GPU kernel), ``rgpu``'s HTTP API client and its job submission, and the
sidebar's server extension.

- :func:`refuse_plain_text` raises :class:`~.errors.InsecureConnection`
  before a token would go over ``ws://`` or ``http://`` to a host that does
  not resolve to this machine's loopback alone (:func:`is_loopback`), unless
  the caller says ``insecure`` (``--insecure``, ``RGPU_INSECURE=1``,
  ``insecure=True``).
- :func:`ssl_context` is ``None`` for ``ws://`` and ``http://``; for
  ``wss://`` and ``https://`` it verifies the server's certificate and host
  name against the system's CAs *plus* ``cafile`` (``--cafile`` /
  ``RGPU_CA``: a CA's certificate, or a self-signed server's own
  certificate). Contexts are cached: building one reads the system's CA
  bundle, which costs tens of milliseconds, and the sidebar polls.
- :func:`tls_failure` turns an :class:`ssl.SSLError` into a one-line
  :class:`~.errors.TlsError` that says what happened and what to do.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
from urllib.parse import urlsplit

from .errors import InsecureConnection, TlsError, UntrustedCertificate

__all__ = ["is_loopback", "refuse_plain_text", "ssl_context", "tls_failure"]

_SECURE = {"ws": "wss", "http": "https"}
# OpenSSL's X509_V_ERR_* codes that need a different hint than "add the CA".
_CERT_HAS_EXPIRED = 10
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine's loopback: every address it resolves to
    is in 127.0.0.0/8 or is ``::1``.

    Decided by the resolved addresses, never by the name: ``localhost`` and
    ``*.localhost`` are loopback only where the hosts file or DNS says so,
    and a name that resolves elsewhere would carry a token in clear across
    the network. A name that does not resolve is not loopback. An address
    literal is not resolved. The connection that follows resolves the name
    again; a name whose DNS someone else controls can answer differently
    then, so for such names use TLS whatever this says.
    """
    if not host:
        return False
    host = host.strip("[]")
    literal = _address(host)
    if literal is not None:
        return literal.is_loopback
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):  # socket.gaierror, or a name IDNA cannot encode
        return False
    addresses = [_address(str(info[4][0])) for info in found]
    return bool(addresses) and all(a is not None and a.is_loopback for a in addresses)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``text`` spells (an IPv4-mapped IPv6 one as IPv4), or None for a name."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refuse_plain_text(url: str, insecure: bool = False) -> None:
    """Raise InsecureConnection if a token sent to ``url`` would cross the network in clear."""
    parts = urlsplit(url)
    secure = _SECURE.get(parts.scheme)
    if secure is None or insecure or is_loopback(parts.hostname):
        return
    raise InsecureConnection(
        f"refusing to send the token over plain {parts.scheme}:// to {parts.hostname}, which is not "
        "this machine: anyone on the network in between could read it",
        f"use {secure}://{parts.netloc} (the server runs with --tls self-signed or --certfile), or, "
        "on a network you trust, allow plain text with --insecure (RGPU_INSECURE=1)"
    )


def ssl_context(url: str, cafile: str | None = None) -> ssl.SSLContext | None:
    """The context that verifies ``url``'s server, or None where ``url`` is not TLS.

    ``cafile`` (PEM) is trusted in addition to the system's CAs. Raises
    TlsError, naming the file, when it cannot be read or holds no certificate.
    """
    if urlsplit(url).scheme not in ("wss", "https"):
        return None
    if not cafile:
        return _context(None, None)
    path = os.path.abspath(os.path.expanduser(cafile))
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise TlsError(f"cannot read the CA file {cafile} (--cafile / RGPU_CA): "
                       f"{exc.strerror or exc}") from None
    return _context(path, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _context(cafile: str | None, stamp: tuple[int, int] | None) -> ssl.SSLContext:
    """A verifying client context; ``stamp`` (mtime, size) makes a changed file load anew."""
    context = ssl.create_default_context()  # the system's CAs, host names checked, TLS 1.2+
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except ssl.SSLError as exc:  # before OSError, its base
            raise TlsError(f"the CA file {cafile} (--cafile / RGPU_CA) holds no PEM certificate "
                           f"({exc.reason or exc})") from None
        except OSError as exc:
            raise TlsError(f"cannot read the CA file {cafile} (--cafile / RGPU_CA): "
                           f"{exc.strerror or exc}") from None
    return context


def tls_failure(exc: ssl.SSLError, url: str, cafile: str | None = None) -> TlsError:
    """What a failed TLS handshake with ``url`` means to the user, as one line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = str(exc.verify_message or exc.reason or exc).rstrip(".")
        if exc.verify_code in _NAME_MISMATCH:
            return UntrustedCertificate(
                f"the GPU server at {url} presented a certificate for another name ({why})",
                "connect with a host name that its certificate lists, or give the server a "
                "certificate for this name")
        if exc.verify_code == _CERT_HAS_EXPIRED:
            return UntrustedCertificate(
                f"the GPU server at {url} presented an expired certificate ({why})",
                "the server's admin must renew it")
        trusted = f"neither the system's CAs nor {cafile} vouch for it" if cafile else \
            "the system's CAs do not vouch for it"
        return UntrustedCertificate(
            f"the GPU server at {url} presented a certificate this client does not trust ({why}; "
            f"{trusted})",
            "pass its CA's certificate, or the server's own certificate if it is self-signed, "
            "with --cafile PATH or RGPU_CA=PATH")
    return TlsError(f"TLS with the GPU server at {url} failed ({exc.reason or exc})",
                    "if that server does not serve TLS, use ws:// (it must then be on this "
                    "machine, or see --insecure)")
