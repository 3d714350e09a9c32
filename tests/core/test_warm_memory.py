"""Memory kept warm for received buffers: reused only once nothing uses it."""

from __future__ import annotations

import gc

import numpy as np

from remote_gpu_core.protocol.serialization import allocate_buffer, dumps, loads
from remote_gpu_core.warm_memory import WarmMemory, warm_memory

MIB = 1 << 20


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_block_comes_back_once_its_array_is_gone_and_is_handed_out_again() -> None:
    memory = WarmMemory(kept=16 * MIB)
    first = memory.take(3 * MIB)
    assert first.dtype == np.uint8 and first.nbytes == 3 * MIB and first.flags.writeable
    first[:] = 7
    where = address(first)
    assert memory.unused_bytes == 0
    del first
    gc.collect()
    assert memory.unused_bytes == 4 * MIB  # whole huge pages
    again = memory.take(3 * MIB + 5)  # nearly the same size: the same block
    assert address(again) == where and again.nbytes == 3 * MIB + 5
    assert (memory.reused, memory.fresh, memory.unused_bytes) == (1, 1, 0)


def test_a_block_is_never_handed_out_while_a_view_or_value_made_from_it_lives() -> None:
    memory = WarmMemory(kept=64 * MIB)
    buf = memory.take(2 * MIB)
    buf[:] = np.arange(2 * MIB, dtype=np.uint64).astype(np.uint8)
    expected = buf.copy()
    floats = buf.view(np.float32)[10:]  # as a pickled array's value is: a view, not a copy
    del buf
    gc.collect()
    other = memory.take(2 * MIB)
    other[:] = 0
    assert memory.reused == 0  # the block is still floats', so other is a fresh one
    assert np.array_equal(floats.view(np.uint8), expected[40:])
    del floats
    gc.collect()
    assert memory.unused_bytes == 2 * MIB


def test_a_value_loaded_from_received_buffers_keeps_them(torch: object) -> None:
    import torch as t

    values = {"a": np.arange(MIB, dtype=np.float32), "t": t.arange(MIB, dtype=t.float32)}
    frames = dumps(values)
    received = []
    for frame in frames:
        buf = allocate_buffer(memoryview(frame).nbytes)
        memoryview(buf).cast("B")[:] = memoryview(frame).cast("B")
        received.append(buf)
    got = loads(received)
    del received, buf
    gc.collect()
    for _ in range(3):  # whatever comes back is written over by the next buffers
        allocate_buffer(4 * MIB)[:] = 0xFF
    assert np.array_equal(got["a"], values["a"]) and t.equal(got["t"], values["t"])


def test_unused_blocks_stay_within_the_bound_oldest_given_back_first() -> None:
    memory = WarmMemory(kept=4 * MIB)
    arrays = [memory.take(2 * MIB) for _ in range(3)]
    oldest = address(arrays[0])
    while arrays:
        arrays.pop(0)  # the first given back first
    gc.collect()
    assert memory.unused_bytes == 4 * MIB  # two of three kept
    taken = [memory.take(2 * MIB) for _ in range(2)]
    assert oldest not in {address(a) for a in taken} and memory.reused == 2
    del taken
    gc.collect()
    assert memory.unused_bytes == 4 * MIB
    big = memory.take(8 * MIB)  # larger than the bound: never kept
    del big
    gc.collect()
    assert memory.unused_bytes == 4 * MIB and memory.fresh == 4
    memory.clear()
    assert memory.unused_bytes == 0


def test_small_buffers_are_plain_bytearrays_and_large_ones_come_warm() -> None:
    assert type(allocate_buffer(100)) is bytearray
    before = warm_memory.reused + warm_memory.fresh
    large = allocate_buffer(MIB)
    assert isinstance(large, np.ndarray) and large.nbytes == MIB
    assert warm_memory.reused + warm_memory.fresh == before + 1


def test_where_memory_is_short_the_unused_blocks_go_first_then_memory_error() -> None:
    import subprocess
    import sys

    script = (
        "import gc, resource\n"
        "from remote_gpu_core.warm_memory import WarmMemory\n"
        "MIB = 1 << 20\n"
        "memory = WarmMemory(kept=256 * MIB)\n"
        "a = memory.take(64 * MIB); a[:] = 1; del a; gc.collect()\n"
        "assert memory.unused_bytes == 64 * MIB\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_DATA)\n"
        "used = int(open('/proc/self/status').read().split('VmData:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (used + 32 * MIB, hard))\n"
        "b = memory.take(40 * MIB)  # only once the unused 64 MiB are given back\n"
        "assert memory.unused_bytes == 0 and memory.fresh == 2\n"
        "try:\n"
        "    memory.take(200 * MIB)\n"
        "except MemoryError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: cannot allocate 200 MiB for a received buffer" in done.stdout
