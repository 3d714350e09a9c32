"""The client's decision to compress a transfer (see
:mod:`remote_gpu_core.protocol.compression`), and the work of it.

``RGPU_COMPRESS`` says: ``auto`` (the default), ``always`` or ``never``.
``auto`` never compresses towards a server on loopback or a Unix socket,
where bytes are free; elsewhere it compresses a buffer whose sample shrinks,
unless the link has been measured faster than the codec would make it
(the CPU is then the limit): compressing pays when the sample's speed times
what it saves beats the link's rate. The rate is that of the latest
transfer of a large buffer, measured from request to answer.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from typing import Any

from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol.compression import CODEC, check_compressed, compress, compressible, decompress_into
from remote_gpu_core.protocol.content import THRESHOLD, nbytes
from remote_gpu_core.protocol.serialization import allocate_buffer

__all__ = ["MODES", "CompressionPolicy", "decompressed", "is_loopback"]

MODES = ("auto", "always", "never")
#: ``auto`` offers a pull's answer compression only over a link slower than
#: this (bytes a second): about what the codec makes of small integers here.
PULL_RATE = 150e6


def is_loopback(address: Any) -> bool:
    """Whether a socket's peer address (``ws.remote_address``) is this machine:
    a loopback IP, or a Unix socket (a path or nothing)."""
    if not isinstance(address, tuple) or not address:
        return True
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


class CompressionPolicy:
    """One session's choice; see the module docstring."""

    def __init__(self, mode: str, loopback: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"RGPU_COMPRESS={mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.loopback = loopback
        #: The link's rate as last measured, in bytes a second (None: not yet).
        self.rate: float | None = None

    @classmethod
    def for_peer(cls, address: Any) -> CompressionPolicy:
        return cls(os.environ.get("RGPU_COMPRESS", "auto").strip().lower() or "auto", is_loopback(address))

    @property
    def allowed(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and not self.loopback)

    def observe(self, moved: int, seconds: float) -> None:
        """A transfer carried ``moved`` bytes in ``seconds``, request to answer."""
        if moved >= THRESHOLD and seconds > 0:
            self.rate = moved / seconds

    def codecs(self) -> list[str]:
        """What a pull's answer may use."""
        if self.mode == "always" or (self.allowed and (self.rate is None or self.rate < PULL_RATE)):
            return [CODEC]
        return []

    def compress(self, carried: Sequence[Any]) -> tuple[list[Any], list[int], list[int]]:
        """``(buffers, compressed, raw_sizes)``: ``carried`` with each large one that is
        worth it compressed; their indices and sizes before."""
        out: list[Any] = list(carried)
        compressed: list[int] = []
        raw_sizes: list[int] = []
        if not self.allowed:
            return out, compressed, raw_sizes
        for k, buf in enumerate(carried):
            size = nbytes(buf)
            if size < THRESHOLD:
                continue
            sample = compressible(buf)
            pays = self.mode == "always" or self.rate is None or sample.speed * (1 - sample.ratio) > self.rate
            if sample.worth and pays:
                out[k] = compress(buf)
                compressed.append(k)
                raw_sizes.append(size)
        return out, compressed, raw_sizes


def decompressed(buffers: Sequence[Any], compressed: Sequence[int], raw_sizes: Sequence[int]) -> list[Any]:
    """``buffers`` with the ``compressed`` ones decompressed into fresh memory."""
    bad = check_compressed(len(buffers), compressed, raw_sizes)
    if bad:
        raise ProtocolError(f"the pull's answer does not add up: {bad}")
    out = list(buffers)
    for k, size in zip(compressed, raw_sizes):
        buf = allocate_buffer(size)
        decompress_into(out[k], buf)
        out[k] = buf
    return out
