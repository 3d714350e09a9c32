"""Causes of death: a dying worker is described in one line, with the cell's line where known.

Real kernels on CPU slots die of a segfault, an abort, ``os._exit``, ``exit()``
called from C and the worker's memory limit; the cell fails with that line,
the session goes on with a fresh worker, and the job keeps the cause, which
``rgpu job`` shows. The parsing of faulthandler's reports is tested on its own
at the end.
"""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3

import pytest

from remote_gpu_kernel import Client, WorkerDied
from remote_gpu_kernel.cli import main as rgpu
from remote_gpu_server.workers import death
from servers import ServerProcess


def quiet(_: object) -> None:
    pass


@pytest.mark.parametrize(("code", "cause"), [
    ("import ctypes\nx = 1\nctypes.string_at(0)",
     "Segmentation fault (signal SIGSEGV) at line 3 of the cell: ctypes.string_at(0)"),
    ("import os\n\nos.abort()", "Aborted (signal SIGABRT) at line 3 of the cell: os.abort()"),
    ("import os; os._exit(7)", "exit code 7 (os._exit, or exit() in C code)"),
    ("import ctypes\nctypes.CDLL(None).exit(5)", "exit code 5"),
], ids=["segfault", "abort", "os._exit", "exit-from-c"])
def test_the_cause_of_death_names_the_signal_and_the_line(server: ServerProcess, alice: str, code: str,
                                                          cause: str) -> None:
    notices: list[str] = []
    with Client(server.url, alice).session(on_notice=notices.append) as s:
        s.execute("keep = 1", on_output=quiet)
        with pytest.raises(WorkerDied) as died:
            s.execute(code, on_output=quiet)
        message = str(died.value)
        assert cause in message and "\n" not in message
        assert "variables are gone" in message
        assert s.execute("print('keep' in globals())", on_output=quiet).stdout == "False\n"
        assert any(cause in n for n in notices)  # the next cell says so too
    state, error = sqlite3.connect(server.db).execute(
        "SELECT state, error FROM jobs WHERE code = ?", (code,)).fetchone()
    assert state == "failed" and cause in error


def test_a_fault_in_a_function_of_an_earlier_cell_names_that_cell(server: ServerProcess, alice: str) -> None:
    with Client(server.url, alice).session() as s:
        defined = s.execute("import ctypes\ndef crash():\n    return ctypes.string_at(0)", on_output=quiet)
        with pytest.raises(WorkerDied, match=re.escape(
                f"at line 3 of cell [{defined.execution_count}]: return ctypes.string_at(0)")):
            s.execute("crash()", on_output=quiet)


def test_out_of_host_memory_is_said_with_the_limit_and_rgpu_job_shows_it(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--worker-memory", "256M"]
    fresh_server.start()
    token = fresh_server.token("alice")
    if "cgroup" not in "".join(fresh_server.log):
        pytest.skip("no memory cgroup here: the worker limits itself and the cell gets MemoryError")
    with Client(fresh_server.url, token).session() as s:
        with pytest.raises(WorkerDied, match=r"out of host memory \(limit 256 MiB\)"):
            s.execute("hog = bytearray(1 << 30)", on_output=quiet)
        assert s.execute("1", on_output=quiet).ok
    job = sqlite3.connect(fresh_server.db).execute("SELECT id FROM jobs WHERE code LIKE 'hog%'").fetchone()[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert rgpu(["job", str(job), "--url", fresh_server.url, "--token", token]) == 0
    shown = " ".join(out.getvalue().split())  # rich wraps long values
    assert "the worker died: out of host memory (limit 256 MiB)" in shown


REPORT = """\
Fatal Python error: Segmentation fault

Thread 0x00007f1 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 324 in wait
  File "/usr/lib/python3.11/threading.py", line 622 in wait

Current thread 0x00007f2 (most recent call first):
  File "/usr/lib/python3.11/ctypes/__init__.py", line 519 in string_at
  File "/tmp/ipykernel_41/{digest}.py", line 2 in <module>
  File "/venv/IPython/core/interactiveshell.py", line 3577 in run_code

Extension modules: zmq.backend.cython._zmq, tornado.speedups (total: 2)
"""


def test_a_report_names_the_running_cell_or_the_innermost_frame() -> None:
    code = "import ctypes\nctypes.string_at(0)  # boom"
    digest = death._cell_hash(code)
    report = REPORT.format(digest=digest)
    fault = death.parse_report(report)
    assert fault is not None and fault.error == "Segmentation fault"
    assert [f.function for f in fault.frames] == ["string_at", "<module>", "run_code"]
    assert [f.function for f in fault.other_frames] == ["wait", "wait"]
    assert death.describe(-11, report=report, cells=[(1, "x = 1"), (None, code)]) == (
        "Segmentation fault (signal SIGSEGV) at line 2 of the cell: ctypes.string_at(0)  # boom")
    # A cell this worker did not run (it was replaced since): the line, not its code.
    assert death.describe(-11, report=report, cells=[(1, "x = 1")]) == (
        "Segmentation fault (signal SIGSEGV) at line 2 of an earlier cell")
    # No cell in it (a crash in a thread of a library): the innermost frame.
    library = "\n".join(line for line in report.splitlines() if "ipykernel_41" not in line)
    assert death.describe(None, report=library) == (
        "Segmentation fault (signal SIGSEGV) in string_at (__init__.py, line 519)")


def test_without_a_report_the_code_says_it() -> None:
    assert death.describe(3) == "exit code 3 (os._exit, or exit() in C code)"
    assert death.describe(-9).startswith("signal SIGKILL")
    assert death.describe(-15) == "signal SIGTERM"
    assert death.describe(-9, explained="out of host memory (limit 1 GiB)") == "out of host memory (limit 1 GiB)"
    assert death.parse_report("some text without a fatal error") is None
    assert death.host_oom(-9, None) is None and death.host_oom(0, 0) is None


def test_a_report_that_is_a_link_is_not_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = tmp_path / "secret"
    secret.write_text("Fatal Python error: not yours\n")
    (tmp_path / "faults").symlink_to(secret)
    assert death.read_report(tmp_path / "faults") is None
    (tmp_path / "real").write_text("")
    assert death.read_report(tmp_path / "real") is None  # empty: nothing to say
