"""Inside the worker: what came of a push cut short is kept, bounded, and filled on from where it stopped.

Real memfds, an injected clock; the end-to-end resume (a link cut in the
middle of a push) is in ``tests/client/test_transfer_resume.py``.
"""

from __future__ import annotations

import mmap
import os

from remote_gpu_server.worker_process.buffer_cache import BufferCache, CacheFiller, ResumingFiller
from remote_gpu_server.worker_process.cut_pushes import KEEP_FOR, CutPushes

D1, D2 = "1" * 32, "2" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def memfd(size: int) -> int:
    fd = os.memfd_create("test-cut", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_what_came_is_held_until_taken() -> None:
    cut = CutPushes()
    fd = memfd(100)
    cut.keep([(D1, fd, 40)], limit=1000)
    assert cut.received(D1) == 40 and cut.received(D2) == 0
    assert cut.take(D1) == (fd, 40)
    assert cut.received(D1) == 0 and cut.take(D1) is None
    os.close(fd)


def test_only_the_latest_cut_is_kept_and_within_the_budget() -> None:
    cut = CutPushes()
    old, big, small = memfd(100), memfd(900), memfd(200)
    cut.keep([(D1, old, 10)], limit=1000)
    cut.keep([(D1, big, 500), (D2, small, 50)], limit=1000)
    assert not is_open(old), "a new cut replaces the old one"
    assert cut.received(D1) == 500 and cut.received(D2) == 0
    assert not is_open(small), "over the budget: closed, not kept"
    cut.clear()
    assert not is_open(big)


def test_what_came_is_dropped_after_a_while() -> None:
    clock = Clock()
    cut = CutPushes(clock)
    fd = memfd(100)
    cut.keep([(D1, fd, 40)], limit=1000)
    clock.now += KEEP_FOR - 1
    assert cut.received(D1) == 40
    clock.now += 2
    assert cut.received(D1) == 0
    assert not is_open(fd)


def test_a_filler_cut_midway_is_filled_on_from_there() -> None:
    whole = bytes(range(256)) * 64  # 16 KiB
    first = CacheFiller([len(whole)], [True])
    first.add(whole[:5000])
    (index, fd, came), = first.cut()
    assert (index, came) == (0, 5000)
    first.abandon()
    assert is_open(fd), "the cut memfd is the caller's, not closed with the rest"
    rest = ResumingFiller([len(whole) - came], [True], {0: (fd, came)})
    rest.add(whole[came:])
    assert rest.done
    (got_fd, _), = rest.finish()
    assert got_fd == fd
    with mmap.mmap(fd, len(whole), access=mmap.ACCESS_READ) as data:
        assert bytes(data) == whole
    os.close(fd)


def test_the_cache_seals_a_buffer_that_came_whole_and_keeps_a_part() -> None:
    cache = BufferCache(1 << 20)
    whole, part = memfd(4096), memfd(4096)
    cache.keep_cut([(D1, whole, 4096), (D2, part, 1000)])
    held = cache.get(D1)
    assert held is not None and held[1] == 4096, "a buffer that came whole is cached"
    assert cache.cut.received(D1) == 0 and cache.cut.received(D2) == 1000 and cache.get(D2) is None
    cache.clear()
    assert not is_open(whole) and not is_open(part)
