"""Nothing sent twice: large buffers named by content, per session (issue 19).

One server with a session cache of 160 MiB (``--session-cache``), so that
one 100 MiB array fits and a second one evicts the first. Bytes are counted
where they cross: a TCP proxy between the client and the server.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pytest

from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.content import digest
from remote_gpu_kernel import Client
from remote_gpu_kernel.sync import Session
from raw_client import RawClient
from servers import ServerProcess
from tcp_proxy import TcpProxy

MIB = 1 << 20
#: An array of about 100 MiB, its bytes crossing the link once.
SIZE = 100 * MIB
#: What a push or a pull that names its buffer instead may carry: its pickle and the header.
SMALL = 64 << 10


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str, str]]:
    proc = ServerProcess(tmp_path_factory.mktemp("content-cache"), "cpu:2", "--session-cache", "160M").start()
    try:
        yield proc, proc.token("alice"), proc.token("bob")
    finally:
        proc.stop()


@pytest.fixture
def proxy(world: tuple[ServerProcess, str, str]) -> Iterator[TcpProxy]:
    link = TcpProxy.for_url(world[0].url)
    yield link
    link.close()


def _array(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 31, size // 4, dtype=np.int32)


def _remote_digest(s: Session, name: str) -> str:
    """The digest of the worker's copy of array ``name``, computed there."""
    code = f"import xxhash\nprint(xxhash.xxh3_128_hexdigest({name}.tobytes()))"
    result = s.execute(code, on_output=lambda _: None)
    result.raise_for_error()
    return result.stdout.strip()


def _up(proxy: TcpProxy, action: object) -> int:
    before = proxy.up
    assert callable(action)
    action()
    return proxy.up - before


def test_a_second_push_of_the_same_array_sends_only_its_digest(world: tuple[ServerProcess, str, str],
                                                               proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(1)
    with Client(proxy.url, alice).session() as s:
        first = _up(proxy, lambda: s.push(a=a))
        again = _up(proxy, lambda: s.push(a=a))
        assert first > SIZE and again < SMALL, (first, again)
        assert _remote_digest(s, "a") == digest(a)
        counts = s.transfer_counts
        assert counts.pushed >= SIZE and counts.push_skipped >= SIZE and counts.push_misses == 0
        # Under another name too: the bytes are what is named, not the variable.
        assert _up(proxy, lambda: s.push(b=a)) < SMALL
        assert _remote_digest(s, "b") == digest(a)


def test_pull_after_push_sends_only_digests_and_gives_a_copy(world: tuple[ServerProcess, str, str],
                                                             proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(2)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        before = proxy.down
        back = s.pull("a")["a"]
        assert proxy.down - before < SMALL
        assert np.array_equal(back, a) and not np.shares_memory(back, a)
        back[:] = 0  # the pulled copy is the user's own
        assert digest(a) == digest(_array(2))
        # Pulled before: the next pull of the same bytes is named only too.
        s.execute("c = a.copy()", on_output=lambda _: None).raise_for_error()
        before = proxy.down
        assert np.array_equal(s.pull("c")["c"], a) and proxy.down - before < SMALL


def test_a_buffer_changed_in_place_is_sent_again(world: tuple[ServerProcess, str, str], proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(3)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        a[12345] += 1  # here, after the push
        assert _up(proxy, lambda: s.push(a=a)) > SIZE
        assert _remote_digest(s, "a") == digest(a)
        # Pull: the client's own copy changed since it was pushed: the bytes come.
        pushed = digest(a)
        a[0] += 1
        before = proxy.down
        back = s.pull("a")["a"]
        assert proxy.down - before > SIZE and digest(back) == pushed
        assert s.transfer_counts.pull_misses == 1


def test_a_cell_that_changes_a_pushed_array_does_not_change_the_next_push(
        world: tuple[ServerProcess, str, str], proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(4)
    with Client(proxy.url, alice).session() as s:
        s.push(x=a)
        s.execute("x[:] = 7", on_output=lambda _: None).raise_for_error()  # in the worker, in place
        assert _up(proxy, lambda: s.push(y=a)) < SMALL  # the worker still holds what was pushed
        assert _remote_digest(s, "y") == digest(a)
        # y and a later z made from the same cached bytes share no memory either.
        s.push(z=a)
        s.execute("y[0] = -1\nimport numpy as np\nassert z[0] != -1 and not np.shares_memory(y, z)",
                  on_output=lambda _: None).raise_for_error()
        assert _remote_digest(s, "z") == digest(a)


#: A hostile cell: it finds the cache's memfds among its file descriptors and
#: tries to change them every way it can; prints what happened to each try.
TAMPER = """\
import mmap, os
tries = []
for name in os.listdir('/proc/self/fd'):
    fd = int(name)
    try:
        if 'rgpu-pushed' not in os.readlink(f'/proc/self/fd/{fd}'):
            continue
    except OSError:
        continue
    for attempt in (lambda: os.pwrite(fd, b'x', 0), lambda: os.ftruncate(fd, 1),
                    lambda: mmap.mmap(fd, 1 << 20),
                    lambda: os.pwrite(os.open(f'/proc/self/fd/{fd}', os.O_RDWR), b'x', 0)):
        try:
            attempt()
            tries.append('changed')
        except PermissionError:
            tries.append('refused')
print(len(tries), sorted(set(tries)))
"""


def test_a_cell_cannot_change_the_cached_bytes(world: tuple[ServerProcess, str, str], proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(10, 8 * MIB)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        result = s.execute(TAMPER, on_output=lambda _: None)
        result.raise_for_error()
        count, outcomes = result.stdout.strip().split(" ", 1)
        assert int(count) >= 4 and outcomes == "['refused']"  # the cache's fd, and the variable's mapping's
        assert _up(proxy, lambda: s.push(b=a)) < SMALL
        assert _remote_digest(s, "b") == digest(a)


def test_a_worker_that_lost_its_cache_gets_the_bytes_after_all(world: tuple[ServerProcess, str, str],
                                                               proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(5)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        # The worker lets go of what it held, and the client does not know
        # (here the cell does it; a worker that died and was replaced would too).
        s.execute("import gc\nfor o in gc.get_objects():\n    if type(o).__name__ == 'BufferCache':\n        o.clear()",
                  on_output=lambda _: None).raise_for_error()
        sent = _up(proxy, lambda: s.push(a=a))
        assert SIZE < sent < SIZE + 8 * MIB  # the digest, told it is missing, then the bytes once
        assert s.transfer_counts.push_misses == 1
        assert _remote_digest(s, "a") == digest(a)
        # A restart the client asks for: it knows the fresh worker holds nothing.
        s.restart()
        assert _up(proxy, lambda: s.push(a=a)) > SIZE
        assert s.transfer_counts.push_misses == 1
        assert _remote_digest(s, "a") == digest(a)


def test_a_cell_whose_pipelined_push_missed_runs_once_with_the_bytes(world: tuple[ServerProcess, str, str],
                                                                    proxy: TcpProxy) -> None:
    # A %%gpu -i a -o b cell sends its push, the cell and the pull back to back
    # (Session.run): where the worker no longer holds the buffer the push names,
    # nothing is set, the cell and the pull behind it do not run, and the client
    # pushes the bytes and runs the cell then: once, with the right value.
    _, alice, _ = world
    a = _array(9)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        s.execute("runs = 0", on_output=lambda _: None).raise_for_error()
        s.execute("import gc\nfor o in gc.get_objects():\n    if type(o).__name__ == 'BufferCache':\n        o.clear()",
                  on_output=lambda _: None).raise_for_error()
        # c is new to the worker, its bytes are a's: the push names them by digest.
        result = s.run("runs += 1\nb = c[:4].copy()", push={"c": a}, pull=["b", "runs"],
                       on_output=lambda _: None)
        assert result.ok and result.values["runs"] == 1
        assert (result.values["b"] == a[:4]).all()
        assert s.transfer_counts.push_misses == 1
        assert _remote_digest(s, "c") == digest(a)


def test_the_least_recently_used_buffer_is_evicted(world: tuple[ServerProcess, str, str], proxy: TcpProxy) -> None:
    _, alice, _ = world
    a, b = _array(6), _array(7)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
        s.push(b=b)  # 200 MiB in a cache of 160 MiB: a goes
        assert _up(proxy, lambda: s.push(b=b)) < SMALL
        assert _up(proxy, lambda: s.push(a=a)) > SIZE  # b goes now
        assert s.transfer_counts.push_misses == 0  # the client's mirror let go of a as the worker did
        assert _up(proxy, lambda: s.push(b=b)) > SIZE
        assert _remote_digest(s, "a") == digest(a) and _remote_digest(s, "b") == digest(b)


def test_a_new_session_starts_empty(world: tuple[ServerProcess, str, str], proxy: TcpProxy) -> None:
    _, alice, _ = world
    a = _array(8, 8 * MIB)
    with Client(proxy.url, alice).session() as s:
        s.push(a=a)
    with Client(proxy.url, alice).session() as s:
        assert _up(proxy, lambda: s.push(a=a)) > 8 * MIB
        assert s.transfer_counts.push_misses == 0


def test_a_digest_never_reaches_another_users_buffer(world: tuple[ServerProcess, str, str]) -> None:
    # Hostile: bob names, by digest, an array alice pushed, without its bytes.
    # His worker holds nothing of hers: it says the digest is missing and
    # sets nothing; alice's session is untouched.
    server, alice, bob = world
    secret = _array(9, 4 * MIB)
    with Client(server.url, alice).session() as s:
        s.push(secret=secret)
        buffers: list[pickle.PickleBuffer] = []
        head = pickle.dumps(np.zeros_like(secret), protocol=5, buffer_callback=buffers.append)
        with RawClient(server.url, bob) as raw:
            raw.hello()
            raw.lease()
            raw.send(m.Push(2, ["stolen"], [2], (head,), ["", digest(secret)], [1]))
            done = raw.answer(2, m.PushDone)
            assert isinstance(done, m.PushDone) and done.missing == [digest(secret)] and done.names == []
            raw.send(m.Execute(3, "print('stolen' in globals())"))
            outputs = []
            while not isinstance(msg := raw.answer(3, m.Output, m.ExecuteDone), m.ExecuteDone):
                outputs.append(msg)
            assert "False" in "".join(o.content.get("text", "") for o in outputs)
            # A malformed list is refused by the server, before any worker.
            raw.send(m.Push(4, ["x"], [2], (head,), ["", "not a digest"], [1]))
            refused = raw.answer(4, m.PushDone)
            assert isinstance(refused, m.Error) and refused.code == m.ErrorCode.BAD_REQUEST
        assert _remote_digest(s, "secret") == digest(secret)


def test_the_default_budget_fits_in_a_workers_memory() -> None:
    from remote_gpu_server.connections.limits import SESSION_CACHE, Limits

    assert Limits().resolve(None).session_cache == SESSION_CACHE
    assert Limits().resolve(4 << 30).session_cache == 1 << 30  # a quarter of a small worker
    assert Limits(session_cache=0).resolve(4 << 30).welcome()["session_cache"] == 0
