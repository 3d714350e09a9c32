"""The whole server on loopback: real kernels on CPU slots, real SQLite."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from contextlib import redirect_stdout

import numpy as np
import pytest

from remote_gpu_kernel import Client, RemoteError, SerializationError, SessionReleased, WorkerDied
from remote_gpu_core.protocol import messages as m
from servers import ServerProcess


@pytest.fixture
def session(server: ServerProcess, alice: str):  # type: ignore[no-untyped-def]
    with Client(server.url, alice).session() as s:
        yield s


def test_variables_in_and_out(session, torch) -> None:  # type: ignore[no-untyped-def]
    class Counter:
        def __init__(self, n: int) -> None:
            self.n = n

        def bump(self) -> int:
            self.n += 1
            return self.n

    big = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    session.push(a=big, t=torch.arange(6.0).reshape(2, 3), f=lambda x: x * 10, c=Counter(41))
    result = session.execute("b = a.T.copy(); u = t * 2; g = f(3); k = c.bump(); import os\n"
                             "cvd = os.environ['CUDA_VISIBLE_DEVICES']", on_output=lambda _: None)
    assert result.ok, result.error
    back = session.pull("b", "u", "g", "k", "c", "cvd")
    assert np.array_equal(back["b"], big.T) and back["b"].flags.writeable
    assert torch.equal(back["u"], torch.arange(6.0).reshape(2, 3) * 2)
    assert back["g"] == 30 and back["k"] == 42 and back["c"].n == 42
    assert back["cvd"] == ""  # a CPU slot hides every GPU


def test_remote_namespace_lives_between_cells_and_pull_of_missing_name(session) -> None:  # type: ignore[no-untyped-def]
    session.execute("x = 5", on_output=lambda _: None)
    assert session.execute("x + 1", on_output=lambda _: None).outputs[-1].content["data"]["text/plain"] == "6"
    with pytest.raises(RemoteError, match="not defined"):
        session.pull("never_defined")
    assert session.pull("x") == {"x": 5}  # the session is still usable


def test_unpicklable_variable_is_named_and_nothing_is_sent(session) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SerializationError, match="'gen'"):
        session.push(ok=1, gen=(i for i in range(2)))
    with pytest.raises(RemoteError, match="not defined"):
        session.pull("ok")
    session.execute("import threading; lock = threading.Lock()", on_output=lambda _: None)
    with pytest.raises(RemoteError, match="lock"):
        session.pull("lock")


def test_streaming_output_arrives_while_the_cell_runs(session) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[float, m.Output]] = []
    start = time.monotonic()
    result = session.execute("import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')",
                             on_output=lambda o: seen.append((time.monotonic() - start, o)))
    streams = [(t, o.content["text"]) for t, o in seen if o.msg_type == "stream"]
    assert [text for _, text in streams] == ["first\n", "second\n"]
    assert streams[1][0] - streams[0][0] > 0.7  # the first line came a second before the end
    seqs = [o.seq for _, o in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert result.ok


def test_default_output_writes_streams_to_local_stdout(session) -> None:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    with redirect_stdout(buf):
        session.execute("print('to stdout')")
    assert buf.getvalue() == "to stdout\n"


def test_rich_display_and_matplotlib_figure(session) -> None:  # type: ignore[no-untyped-def]
    result = session.execute(
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3]); plt.show()\n",
        on_output=lambda _: None,
    )
    assert result.ok, result.error
    kinds = [o.content.get("data", {}) for o in result.outputs if o.msg_type == "display_data"]
    assert any(d.get("text/html") == "<b>bold</b>" for d in kinds)
    assert any("image/png" in d for d in kinds)


def test_remote_error_carries_the_remote_traceback(session) -> None:  # type: ignore[no-untyped-def]
    result = session.execute("def inner():\n    raise ValueError('bad value 42')\ninner()",
                             on_output=lambda _: None)
    assert result.status == "error"
    assert isinstance(result.error, RemoteError)
    assert result.error.ename == "ValueError" and result.error.evalue == "bad value 42"
    rendered = "\n".join(result.error._render_traceback_())
    assert "inner" in rendered and "bad value 42" in rendered
    with pytest.raises(RemoteError):
        result.raise_for_error()


def test_interrupt_stops_the_remote_cell(session) -> None:  # type: ignore[no-untyped-def]
    threading.Timer(1.0, session.interrupt).start()
    start = time.monotonic()
    result = session.execute("import time\ntime.sleep(60)", on_output=lambda _: None)
    assert time.monotonic() - start < 10
    assert result.status == "error" and result.error is not None
    assert result.error.ename == "KeyboardInterrupt"
    assert session.execute("1 + 1", on_output=lambda _: None).ok


def test_cell_timeout_interrupts(session) -> None:  # type: ignore[no-untyped-def]
    from remote_gpu_kernel import RemoteTimeout

    start = time.monotonic()
    with pytest.raises(RemoteTimeout, match="timeout of 1 s"):
        session.execute("import time\ntime.sleep(30)", timeout=1, on_output=lambda _: None)
    assert time.monotonic() - start < 10
    session.execute("y = 1", on_output=lambda _: None)
    assert session.pull("y") == {"y": 1}


@pytest.mark.parametrize(("code", "how"), [("import os; os._exit(3)", "exit code 3"),
                                           ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                                            "signal SIGSEGV")])
def test_worker_death_is_reported_and_the_session_restarts(server: ServerProcess, alice: str,
                                                           code: str, how: str) -> None:
    notices: list[str] = []
    with Client(server.url, alice).session(on_notice=notices.append) as s:
        s.execute("keep = 1", on_output=lambda _: None)
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=how) as info:
            s.execute(f"print('about to die', flush=True)\n{code}", on_output=lambda _: None)
        assert time.monotonic() - start < 5
        assert "variables are gone" in str(info.value)
        result = s.execute("'keep' in globals()", on_output=lambda _: None)
        assert result.outputs[-1].content["data"]["text/plain"] == "False"
        assert any("restarted" in n and how in n for n in notices)
    db = sqlite3.connect(server.db)
    state, error = db.execute("SELECT state, error FROM jobs WHERE code LIKE ? ORDER BY id DESC",
                              (f"%{code}%",)).fetchone()
    assert state == "failed" and how in error


def test_jobs_and_their_output_are_journaled(server: ServerProcess, alice: str) -> None:
    with Client(server.url, alice).session() as s:
        result = s.execute("print('journal me')\n7 * 6", on_output=lambda _: None)
    db = sqlite3.connect(server.db)
    user, state, code, started, ended, slots = db.execute(
        "SELECT u.name, j.state, j.code, j.started, j.ended, j.slots FROM jobs j "
        "JOIN users u ON u.id = j.user_id WHERE j.id = ?", (result.job,)).fetchone()
    assert (user, state) == ("alice", "completed") and "journal me" in code
    assert started <= ended and slots.startswith("cpu")
    rows = db.execute("SELECT seq, msg_type, content FROM outputs WHERE job_id = ? ORDER BY seq",
                      (result.job,)).fetchall()
    types = [r[1] for r in rows]
    assert "stream" in types and "execute_result" in types
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_two_users_lease_at_once(server: ServerProcess, alice: str) -> None:
    bob = server.token("bob")
    with Client(server.url, alice).session() as a, Client(server.url, bob).session() as b:
        assert set(a.slots) | set(b.slots) == {"cpu0", "cpu1"}
        a.execute("who = 'alice'", on_output=lambda _: None)
        b.execute("who = 'bob'", on_output=lambda _: None)
        assert a.pull("who") == {"who": "alice"} and b.pull("who") == {"who": "bob"}


def test_requests_after_release_are_refused(server: ServerProcess, alice: str) -> None:
    s = Client(server.url, alice).session()
    s.release()
    with pytest.raises(SessionReleased):
        s.execute("1")


def test_an_interrupt_sent_with_the_cell_is_not_lost(session) -> None:  # type: ignore[no-untyped-def]
    """An interrupt that reaches the server before the worker starts the code."""
    import asyncio

    inner = session._session  # the AsyncSession behind the blocking one

    async def race() -> object:
        cell = asyncio.ensure_future(inner.execute("import time; time.sleep(60)", lambda _: None))
        await asyncio.sleep(0)  # the Execute frame is on its way
        await inner.interrupt()
        return await asyncio.wait_for(cell, 20)

    from remote_gpu_kernel.sync import run

    start = time.monotonic()
    result = run(race())
    assert time.monotonic() - start < 20
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"  # type: ignore[attr-defined]
