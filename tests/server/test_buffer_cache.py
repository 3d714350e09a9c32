"""The worker's cache of pushed buffers, in this process: sealed memfds, mapped copy-on-write."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from remote_gpu_core.errors import ProtocolError
from remote_gpu_server.worker_process.buffer_cache import BufferCache, CacheFiller, copy_on_write

MIB = 1 << 20


def _filled(data: list[bytes], named: list[bool]) -> list[tuple[int | None, object]]:
    filler = CacheFiller([len(d) for d in data], named)
    joined = b"".join(data)
    for start in range(0, len(joined), 300_000):  # pieces that straddle the buffers
        filler.add(joined[start : start + 300_000])
    assert filler.done
    return filler.finish()


def test_pushed_bytes_are_sealed_and_variables_map_them_copy_on_write() -> None:
    data = [os.urandom(MIB + 5), b"small", os.urandom(2 * MIB)]
    (fd, none), (no_fd, small), (fd2, _) = _filled(data, [True, False, True])
    assert fd is not None and fd2 is not None and none is None and no_fd is None
    assert bytes(small) == b"small"  # type: ignore[arg-type]
    cache = BufferCache(8 * MIB)
    try:
        cache.add("a" * 32, fd, len(data[0]))
        cache.add("b" * 32, fd2, len(data[2]))
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)  # a cell cannot change what was pushed
        with pytest.raises(PermissionError):
            mmap.mmap(fd, len(data[0]))  # nor map it shared and writable
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        x = np.frombuffer(copy_on_write(fd, len(data[0])), dtype=np.uint8)
        y = np.frombuffer(copy_on_write(fd, len(data[0])), dtype=np.uint8)
        x[:] = 0
        assert bytes(y) == data[0] and os.pread(fd, 16, 0) == data[0][:16]
        assert cache.get("a" * 32) == (fd, len(data[0]))
    finally:
        cache.clear()
    assert cache.get("a" * 32) is None and cache.holdings.held == 0


def test_the_cache_lets_go_of_the_oldest_and_of_a_closed_descriptor() -> None:
    data = [os.urandom(MIB)] * 3
    arrived = _filled(data, [True, True, True])
    cache = BufferCache(2 * MIB + 1)
    keys = ["a" * 32, "b" * 32, "c" * 32]
    for key, (fd, _) in zip(keys, arrived):
        assert fd is not None
        cache.add(key, fd, MIB)
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is not None
    with pytest.raises(OSError):
        os.fstat(arrived[0][0])  # type: ignore[arg-type]  # evicted: closed
    held = cache.get(keys[2])
    assert held is not None
    os.close(held[0])  # a cell closes a descriptor it does not know
    reused = os.open(os.devnull, os.O_RDONLY)  # and the number may come back as another file
    try:
        assert cache.get(keys[2]) is None  # said missing: the client sends the bytes again
    finally:
        os.close(reused)
    cache.set_limit(0)
    assert cache.get(keys[1]) is None and cache.holdings.held == 0


def test_a_filler_refuses_more_bytes_than_announced_and_closes_what_it_made() -> None:
    filler = CacheFiller([MIB], [True])
    filler.add(b"x" * MIB)
    with pytest.raises(ProtocolError, match="more bytes"):
        filler.add(b"y")
    filler.abandon()
    with pytest.raises(ProtocolError, match="announced 1 buffers"):
        CacheFiller([MIB], [True, False])
