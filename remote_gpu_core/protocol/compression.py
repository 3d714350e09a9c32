"""Large buffers compressed where the link, not the CPU, is the bottleneck.

One codec, :data:`CODEC` (zstd at level 1, from ``zstandard``). Whether a
transfer may use it is the client's decision (it knows whether its server
is on loopback, and how fast its link has been): a push says which of its
buffers it compressed (``compressed``, with their ``sizes`` before), a pull
names the codecs the answer may use. Each buffer is sampled first
(:func:`compressible`): what does not shrink travels as it is.

A buffer that does not decompress to the size it announced raises
:class:`~remote_gpu_core.errors.ProtocolError` saying so; nothing of its
value is used. No I/O.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import ProtocolError
from .content import THRESHOLD, check_offsets, check_references
from .messages import Push

__all__ = ["CODEC", "Sample", "check_compressed", "compress", "compressible", "decompress_into", "push_refusal"]

CODEC = "zstd"
#: Level 1: zstd's fastest but one; here 1.2 GB/s on zeros, 120–260 MB/s on small integers.
LEVEL = 1
#: Sampled before compressing a buffer: this many slices of this many bytes, spread over it.
SAMPLES, SAMPLE_BYTES = 4, 64 << 10
#: A buffer is compressed when its sample shrinks to at most this fraction.
WORTH = 0.8


class Sample:
    """What compressing a buffer's sample showed: ``ratio`` (compressed / raw) and
    ``speed`` (raw bytes a second)."""

    def __init__(self, ratio: float, speed: float) -> None:
        self.ratio, self.speed = ratio, speed

    @property
    def worth(self) -> bool:
        return self.ratio <= WORTH


def compressible(buf: Any) -> Sample:
    """Compress slices of ``buf`` and say how well and how fast it went."""
    view = memoryview(buf).cast("B")
    size = view.nbytes
    step = max(SAMPLE_BYTES, size // SAMPLES)
    slices = [view[start : start + SAMPLE_BYTES] for start in range(0, size, step)][:SAMPLES]
    import zstandard  # here: its import costs 30 ms, and only a link that is not loopback uses it

    compressor = zstandard.ZstdCompressor(level=LEVEL)
    started = time.perf_counter()
    out = sum(len(compressor.compress(s)) for s in slices)
    spent = max(time.perf_counter() - started, 1e-6)
    raw = sum(s.nbytes for s in slices)
    return Sample(out / max(raw, 1), raw / spent)


def compress(buf: Any) -> bytes:
    """``buf`` as one zstd frame (every core of this machine at work)."""
    import zstandard

    return zstandard.ZstdCompressor(level=LEVEL, threads=-1).compress(memoryview(buf).cast("B"))


def decompress_into(data: Any, out: Any) -> None:
    """Decompress the frame ``data`` into the writable buffer ``out``, which it must fill exactly."""
    import zstandard

    target = memoryview(out).cast("B")
    size = target.nbytes
    done = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(memoryview(data).cast("B")) as reader:
            while done < size:
                got = reader.readinto(target[done:])
                if not got:
                    break
                done += got
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"a compressed buffer is corrupt ({CODEC}: {exc}); nothing of it was used") from None
    if done != size or extra:
        raise ProtocolError(f"a compressed buffer does not hold the {size} bytes it announced; "
                            "nothing of it was used")


def check_compressed(carried: int, compressed: Sequence[int], sizes: Sequence[int]) -> str | None:
    """Why a list of ``compressed`` indices into the ``carried`` buffers, with
    their raw ``sizes``, does not add up; None when it does."""
    if len(compressed) != len(sizes):
        return f"{len(compressed)} compressed buffers, {len(sizes)} sizes"
    if any(b <= a for a, b in zip(compressed, compressed[1:])):
        return "compressed indices are not ascending"
    if compressed and not (0 <= compressed[0] and compressed[-1] < carried):
        return "a compressed index is out of range"
    if any(s < THRESHOLD for s in sizes):
        return "a compressed buffer is announced smaller than the threshold"
    return None


def push_refusal(msg: Push) -> str | None:
    """Why a push's lists (names, counts, digests, cached, compressed) do not
    add up with its buffers; None when they do. The server checks it before
    a worker sees the push."""
    if len(msg.names) != len(msg.counts) or any(c < 1 for c in msg.counts):
        return "names and counts do not match"
    bad = check_references(sum(msg.counts), msg.digests, msg.cached, len(msg.buffers))
    if bad is None and (msg.compressed or msg.codec) and msg.codec != CODEC:
        bad = f"unknown codec {msg.codec!r} (this server knows {CODEC})"
    return (bad or check_compressed(len(msg.buffers), msg.compressed, msg.raw_sizes)
            or check_offsets(sum(msg.counts), msg.digests, msg.cached, msg.compressed, msg.offsets, len(msg.buffers)))
