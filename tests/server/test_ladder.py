"""The stop ladder on CPU slots, in a real server with real kernels.

A cell that ignores SIGINT is said to, and the next interrupt replaces its
worker; a cancel over HTTP and a cell's timeout take the same ladder; every
process the worker started goes, even one in a session of its own or one
that a double fork left to init with an emptied environment, with or
without a cgroup, and one that ignores SIGTERM gets SIGKILL after the grace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator

import psutil
import pytest

from remote_gpu_kernel import Client, RemoteTimeout, WorkerDied
from remote_gpu_kernel.api import ApiClient
from remote_gpu_core.protocol import messages as m
from remote_gpu_kernel.sync import run
from servers import ServerProcess
from waiting import wait_for

IGNORES_SIGINT = """\
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print(os.getpid(), flush=True)
time.sleep(600)
"""

#: Starts a child in a session of its own and a daemon that a double fork
#: leaves to init, prints the three pids (its own first), and waits.
STARTS_STRAYS = """\
import os, subprocess, sys, time
own = subprocess.Popen(["sleep", "600"], start_new_session=True)
daemon = subprocess.run([sys.executable, "-c",
    "import subprocess; print(subprocess.Popen(['sleep', '600'], start_new_session=True, "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
    capture_output=True, text=True, check=True).stdout.strip()
print(os.getpid(), own.pid, daemon, flush=True)
"""

#: Like STARTS_STRAYS, but each stray also empties its environment (``env -i``),
#: so no mark leads to it: one in a session of its own, one a double fork left to init.
DROPS_ITS_MARK = """\
import os, subprocess, sys
own = subprocess.Popen(['env', '-i', 'setsid', 'sleep', '1000'])
daemon = subprocess.run(['env', '-i', sys.executable, '-c',
    "import subprocess; print(subprocess.Popen(['setsid', 'sleep', '1000'], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
    capture_output=True, text=True, check=True).stdout.strip()
print(os.getpid(), own.pid, daemon, flush=True)
"""

#: Ignores SIGINT and SIGTERM, as does a child it starts.
IGNORES_SIGTERM = """\
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(os.getpid(), child.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """The process ended (a zombie left to a parent that does not reap counts as ended)."""
    try:
        wait_for(lambda: _ended(pid), timeout, f"the end of pid {pid}", every=0.05)
    except AssertionError:
        return False
    return True


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pids(text: str) -> list[int]:
    return [int(word) for word in text.split()]


@pytest.fixture
def ladder_server(fresh_server: ServerProcess) -> Iterator[ServerProcess]:
    fresh_server.args = ["--term-grace", "2", "--kill-grace", "1"]
    yield fresh_server.start()


def test_a_cell_that_ignores_interrupts_is_said_to_and_the_second_interrupt_restarts_it(
        ladder_server: ServerProcess) -> None:
    token = ladder_server.token("alice")
    with Client(ladder_server.url, token).session() as session:
        session.execute("keep = 1", on_output=lambda _: None)
        inner = session._session  # the AsyncSession behind the blocking one

        async def scenario() -> tuple[int, float, str]:
            printed: asyncio.Queue[str] = asyncio.Queue()
            notices: asyncio.Queue[str] = asyncio.Queue()
            cell = asyncio.ensure_future(inner.execute(
                IGNORES_SIGINT, lambda out: printed.put_nowait(out.content.get("text", "")),
                on_notice=notices.put_nowait))
            pid = int(await asyncio.wait_for(printed.get(), 30))
            interrupted = time.monotonic()
            await inner.interrupt()
            notice = await asyncio.wait_for(notices.get(), 30)
            after = time.monotonic() - interrupted
            assert not cell.done()  # the interrupt did nothing: the cell still runs
            await inner.interrupt()
            with pytest.raises(WorkerDied) as died:
                await asyncio.wait_for(cell, 30)
            return pid, after, f"{notice}\n{died.value}"

        pid, after, said = run(scenario())
        notice, error = said.split("\n")
        assert after >= 2.5, f"the notice came {after:.1f} s after the interrupt"
        assert "ignores interrupts" in notice and "Interrupt again to restart" in notice
        assert "interrupted twice" in error and "variables are gone" in error
        assert _gone(pid)
        fresh = session.execute("print('keep' in globals())", on_output=lambda _: None)
        assert fresh.stdout == "False\n"  # a fresh worker, the old variables gone
    db = sqlite3.connect(ladder_server.db)
    state, cause = db.execute("SELECT state, error FROM jobs WHERE code = ?", (IGNORES_SIGINT,)).fetchone()
    assert state == "cancelled" and "ignored the first interrupt" in cause


def test_interrupts_that_land_while_the_output_and_the_notice_are_shown_still_climb_the_ladder(
        server: ServerProcess, alice: str) -> None:
    """Writing output flushes, and a notebook's stop button follows the output
    it saw, so Ctrl-C often lands inside the output handler: it must count
    as an interrupt of the cell, not abandon a cell that goes on holding the GPU."""
    def ctrl_c(_: object) -> None:
        raise KeyboardInterrupt

    with Client(server.url, alice).session(on_notice=ctrl_c) as session:
        session.execute("keep = 1", on_output=lambda _: None)
        with pytest.raises(WorkerDied) as died:  # the output's, then the notice's Ctrl-C
            try:
                session.execute(IGNORES_SIGINT, on_output=ctrl_c)
            except KeyboardInterrupt:
                pytest.fail("the Ctrl-C escaped: the cell was left running")
        assert "interrupted twice" in str(died.value)
        session.on_notice = None
        fresh = session.execute("print('keep' in globals())", on_output=lambda _: None)
        assert fresh.stdout == "False\n"  # the next cell runs at once, on a fresh worker


@pytest.mark.parametrize("args", [[], ["--no-isolation", "--worker-memory", "none", "--worker-pids", "none"]],
                         ids=["isolated", "no-cgroup"])
def test_release_ends_what_the_cell_started_in_sessions_of_its_own(fresh_server: ServerProcess,
                                                                   args: list[str]) -> None:
    """With a cgroup per worker, or (no isolation, no limits) through the mark it inherited."""
    fresh_server.args = args
    fresh_server.start()
    with Client(fresh_server.url, fresh_server.token("alice")).session() as session:
        result = session.execute(STARTS_STRAYS, on_output=lambda _: None)
        assert result.ok, result.error
        kernel, own_session, daemon = _pids(result.stdout)
        for pid in (own_session, daemon):
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert psutil.Process(daemon).ppid() != kernel  # orphaned: only a cgroup or its mark finds it
    for pid in (kernel, own_session, daemon):
        assert _gone(pid), f"process {pid} outlived the release"


def _alive(pids: list[int]) -> bool:
    return all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root server gives each user a uid and a namespace: run as root")
@pytest.mark.parametrize("pids", ["auto", "none"], ids=["pids-cgroup", "no-cgroup"])
def test_what_dropped_its_mark_goes_with_its_worker_and_only_that_worker(fresh_server: ServerProcess,
                                                                         pids: str) -> None:
    """With no memory limit, a worker's pids cgroup still holds what it started;
    with no limit at all, no cgroup does: a stray that emptied its environment is
    then found by the worker's mount namespace. The same user's other session
    keeps its own either way."""
    fresh_server.slots = "cpu:2"
    fresh_server.args = ["--worker-memory", "none", "--worker-pids", pids]
    fresh_server.start()
    token = fresh_server.token("alice")
    processes = ApiClient(fresh_server.url, token).status()["isolation"]["processes"]
    if pids == "auto":
        assert processes.endswith(("(cgroup v1 pids)", "(cgroup v2 pids)")), processes
    else:
        assert processes == "no process limit"
    with Client(fresh_server.url, token).session() as other, Client(fresh_server.url, token).session() as session:
        kept = _pids(other.execute(DROPS_ITS_MARK, on_output=lambda _: None).stdout)
        strays = _pids(session.execute(DROPS_ITS_MARK, on_output=lambda _: None).stdout)
        assert psutil.Process(strays[2]).ppid() != strays[0]  # orphaned
        assert psutil.Process(strays[2]).uids().real == psutil.Process(kept[2]).uids().real  # one uid
        session.restart()
        assert session.execute("1 + 1", on_output=lambda _: None).ok
        assert all(_gone(pid) for pid in strays), "a stray outlived the restart"
        strays = _pids(session.execute(DROPS_ITS_MARK, on_output=lambda _: None).stdout)
        session.release()
        assert all(_gone(pid) for pid in strays), "a stray outlived the release"
        assert _alive(kept)  # the other session's, of the same uid, live on
    assert all(_gone(pid) for pid in kept)
    fresh_server.stop()  # a clean stop removes the server's cgroups too


def test_a_restart_over_http_stops_the_cell_and_everything_it_started(ladder_server: ServerProcess) -> None:
    token = ladder_server.token("alice")
    api = ApiClient(ladder_server.url, token)
    with Client(ladder_server.url, token).session() as session:
        session.execute("keep = 1", on_output=lambda _: None)
        strays = _pids(session.execute(STARTS_STRAYS, on_output=lambda _: None).stdout)
        answer = api.restart(session.id)
        assert answer["restarted"] is True
        assert all(_gone(pid) for pid in strays)
        notices: list[str] = []
        session.on_notice = notices.append
        fresh = session.execute("print('keep' in globals())", on_output=lambda _: None)
        assert fresh.stdout == "False\n"
        assert any("restarted" in n and "variables are gone" in n for n in notices)
        bob = ApiClient(ladder_server.url, ladder_server.token("bob"))
        with pytest.raises(Exception, match="no session"):
            bob.restart(session.id)


def test_a_cancel_over_http_escalates_to_sigkill_for_processes_that_ignore_sigterm(
        ladder_server: ServerProcess) -> None:
    token = ladder_server.token("alice")
    api = ApiClient(ladder_server.url, token)
    with Client(ladder_server.url, token).session() as session:
        inner = session._session

        async def scenario() -> tuple[list[int], dict[str, object], float, BaseException | None]:
            printed: asyncio.Queue[str] = asyncio.Queue()
            cell = asyncio.ensure_future(inner.execute(
                IGNORES_SIGTERM, lambda out: printed.put_nowait(out.content.get("text", ""))))
            pids = _pids(await asyncio.wait_for(printed.get(), 30))
            job = next(j for j in api.jobs() if j["state"] == "running")
            started = time.monotonic()
            answer = await asyncio.to_thread(api.cancel, job["id"])
            took = time.monotonic() - started
            error = None
            try:
                await asyncio.wait_for(cell, 10)
            except WorkerDied as exc:
                error = exc
            return pids, answer, took, error

        pids, answer, took, error = run(scenario())
        assert answer["state"] == "cancelled"
        assert "did not stop when interrupted" in str(answer["error"])
        # 1 s for the interrupt (--kill-grace), 2 s for SIGTERM (--term-grace), then SIGKILL.
        assert 3.0 <= took < 20, f"the cancel took {took:.1f} s"
        assert error is not None and "did not stop when interrupted" in str(error)
        assert all(_gone(pid, timeout=1) for pid in pids)
        assert session.execute("1 + 1", on_output=lambda _: None).ok


def test_a_timeout_takes_the_same_ladder(ladder_server: ServerProcess) -> None:
    code = STARTS_STRAYS + IGNORES_SIGINT
    with Client(ladder_server.url, ladder_server.token("alice")).session() as session:
        printed: list[str] = []
        with pytest.raises(RemoteTimeout, match="did not stop when interrupted"):
            session.execute(code, timeout=2, on_output=lambda out: printed.append(out.content.get("text", "")))
        strays = _pids(printed[0])
        assert all(_gone(pid) for pid in strays)
        assert session.execute("1 + 1", on_output=lambda _: None).ok


def test_restart_from_the_python_api_gives_a_fresh_worker(server: ServerProcess, alice: str) -> None:
    with Client(server.url, alice).session() as session:
        session.execute("keep = 1", on_output=lambda _: None)
        session.restart()
        assert session.execute("print('keep' in globals())", on_output=lambda _: None).stdout == "False\n"


def test_a_plain_interrupt_is_the_same_on_the_wire_as_before() -> None:
    from remote_gpu_core.protocol import encode
    from remote_gpu_core.protocol.framing import Reader

    assert m.Interrupt(3).fields() == {"req": 3}
    reader = Reader()
    for frame in encode(m.Interrupt(0, restart=True)):
        reader.receive_data(frame)
    assert reader.events_received() == [m.Interrupt(0, restart=True)]


def test_the_ladder_finds_a_marked_orphan_that_ignores_sigterm_and_spares_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    import os
    import subprocess
    import sys

    from remote_gpu_server.processes import ladder

    mark = f"test-{os.getpid()}"
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)")
    # A double fork: the process that started it is gone, so no tree leads to it; only its mark does.
    orphan = int(subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
         f"{stubborn!r}], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); "
         "p.stdout.readline(); print(p.pid)"],
        env=dict(os.environ, **{ladder.MARK_VAR: mark}), capture_output=True, text=True, check=True).stdout)
    bystander = subprocess.Popen(["sleep", "60"])  # no mark: not the worker's
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="remote_gpu_server"):
            found = ladder.stop(ladder.Scope(None, mark=mark, uids=frozenset({os.geteuid()})), 0.5)
        assert found == {orphan}
        assert time.monotonic() - started >= 0.5  # it had its grace, then SIGKILL
        assert _gone(orphan, timeout=1) and bystander.poll() is None
        said = [r.getMessage() for r in caplog.records if "SIGKILL" in r.getMessage()]
        assert len(said) == 1 and re.search(rf"1 process\(es\) still ran \d+\.\d s after SIGTERM: "
                                            rf"SIGKILL to {orphan}$", said[0]), said
    finally:
        bystander.kill()
        bystander.wait()


def test_the_ladder_says_sigkill_only_for_what_outlived_sigterm(caplog: pytest.LogCaptureFixture) -> None:
    """A process that ends at SIGTERM is not reported as killed, though it stays a
    zombie until its parent (here: this test) reaps it."""
    import subprocess

    from remote_gpu_server.processes import ladder

    quick = subprocess.Popen(["sleep", "60"])
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="remote_gpu_server"):
            found = ladder.stop(ladder.Scope(quick.pid), 30)
        assert found == {quick.pid}
        assert time.monotonic() - started < 30, "the ladder waited out the grace"
        assert psutil.Process(quick.pid).status() == psutil.STATUS_ZOMBIE  # ended, not reaped yet
        assert not [r.getMessage() for r in caplog.records if "SIGKILL" in r.getMessage()]
    finally:
        quick.kill()
        quick.wait()
