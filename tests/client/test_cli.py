"""The ``rgpu`` job and status commands against a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_gpu_kernel.api import ApiClient
from remote_gpu_kernel.cli import main
from servers import ServerProcess
from waiting import wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    proc = ServerProcess(tmp_path_factory.mktemp("cli"), "cpu:1", "--price-per-gpu-hour", "2")
    token = proc.token("alice")
    proc.start()
    yield proc, token
    proc.stop()


@pytest.fixture
def rgpu(served: tuple[ServerProcess, str], monkeypatch: pytest.MonkeyPatch,
         tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``rgpu(*argv)`` → ``(exit status, stdout, stderr)`` with the server in the environment."""
    server, token = served
    monkeypatch.setenv("RGPU_URL", server.url)
    monkeypatch.setenv("RGPU_TOKEN", token)
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "client.json"))
    monkeypatch.setenv("COLUMNS", "200")

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def script(tmp_path: Path, text: str, name: str = "job.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_submit_follow_job_and_jobs(rgpu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = rgpu("submit", script(tmp_path, "for i in range(3):\n    print('tick', i)\n"),
                          "--retries", "1", "--timeout", "60")
    assert code == 0 and out.strip().isdigit()
    job = out.strip()
    assert f"rgpu logs {job} --follow" in err
    code, out, _ = rgpu("logs", job, "--follow", "--poll", "0.2")
    assert code == 0 and out == "tick 0\ntick 1\ntick 2\n"
    code, out, _ = rgpu("logs", job)
    assert out == "tick 0\ntick 1\ntick 2\n"
    code, out, _ = rgpu("job", job)
    assert code == 0 and "completed" in out and "job.py" in out and "GPU-seconds" in out
    code, out, _ = rgpu("jobs", "--state", "completed")
    assert code == 0 and f"│ {job} " in out and "alice" in out


def test_logs_follow_of_a_failing_job_exits_1(rgpu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = rgpu("submit", script(tmp_path, "print('before')\nraise RuntimeError('boom')\n"))
    code, out, err = rgpu("logs", out.strip(), "-f", "--poll", "0.2")
    assert code == 1 and "before" in out and "RuntimeError" in out
    assert "ended failed: RuntimeError: boom" in err


def test_cancel_status_top_and_usage(rgpu, served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = rgpu("submit", script(tmp_path, "import time\ntime.sleep(300)\n", "sleepy.py"))
    job = out.strip()
    api = ApiClient(served[0].url, served[1])
    wait_for(lambda: api.job(int(job))["state"] == "running", 60, f"job {job} to run", every=0.2)
    _, queued, _ = rgpu("submit", script(tmp_path, "print(1)"), "--priority", "low")
    wait_for(lambda: [q for q in api.status()["queue"] if q["job"] == int(queued)], 30,
             f"job {queued.strip()} in the queue")
    code, out, _ = rgpu("status")
    assert code == 0 and "cpu0" in out and f"alice (you) job {job}" in out
    assert "queue" in out and "low" in out
    code, out, _ = rgpu("top", "--interval", "0.1", "-n", "2")
    assert code == 0 and "cpu0" in out
    code, out, _ = rgpu("cancel", queued.strip())
    assert code == 0 and out.strip() == f"job {queued.strip()} cancelled"
    code, out, _ = rgpu("cancel", job)
    assert code == 0 and out.strip() == f"job {job} cancelled"
    code, out, err = rgpu("cancel", job)
    assert code == 1 and "already ended" in err
    code, out, _ = rgpu("status")
    assert "nobody is waiting" in out
    code, out, _ = rgpu("usage")
    assert code == 0 and "alice (you)" in out and "at 2 per GPU-hour" in out and "cost" in out


def test_status_lists_parked_sessions(rgpu, served) -> None:  # type: ignore[no-untyped-def]
    from remote_gpu_kernel import Client

    session = Client(served[0].url, served[1]).session(notebook="/home/alice/lunch.ipynb")
    try:
        session.execute("x = 1", on_output=lambda _: None)
        session.park()
        code, out, _ = rgpu("status")
        assert code == 0 and "parked (no GPU held)" in out
        assert "alice (you)" in out and session.id[:8] in out and "lunch.ipynb" in out
    finally:
        session.release()
    code, out, _ = rgpu("status")
    assert "parked (no GPU held)" not in out


def test_jobs_and_job_name_a_cell_by_its_notebook_and_first_line(rgpu, served) -> None:  # type: ignore[no-untyped-def]
    from remote_gpu_kernel import Client

    with Client(served[0].url, served[1]).session(notebook="/home/alice/fit.ipynb") as session:
        session.execute("\n# train the model\nmodel_fitted = 1", on_output=lambda _: None)
    code, out, _ = rgpu("jobs", "--kind", "cell")
    assert code == 0 and "fit.ipynb: # train the model" in out, out
    job = ApiClient(served[0].url, served[1]).jobs(kind="cell")
    mine = next(j for j in job if j["first_line"] == "# train the model")
    code, out, _ = rgpu("job", str(mine["id"]))
    assert code == 0 and "/home/alice/fit.ipynb" in out and "# train the model" in out


def test_top_quits_on_q_at_once(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import sys

    import pexpect

    server, token = served
    env = dict(os.environ, RGPU_URL=server.url, RGPU_TOKEN=token, RGPU_CONFIG=str(tmp_path / "client.json"),
               COLUMNS="160", TERM="xterm")
    top = pexpect.spawn(sys.executable, ["-m", "remote_gpu_kernel.cli", "top", "--interval", "600"], env=env,
                        encoding="utf-8", timeout=60, dimensions=(40, 160))
    try:
        top.expect("q quits")  # its first view is up; the next would come in 10 minutes
        started = time.monotonic()
        top.send("q")
        top.expect(pexpect.EOF, timeout=30)
        assert time.monotonic() - started < 30
    finally:
        top.close(force=True)
    assert top.exitstatus == 0


def test_errors_are_one_line_and_exit_1(rgpu, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                        tmp_path: Path) -> None:
    code, _, err = rgpu("submit", str(tmp_path / "missing.py"))
    assert code == 1 and "cannot read" in err
    code, _, err = rgpu("job", "999999")
    assert code == 1 and "no job 999999" in err
    monkeypatch.setenv("RGPU_TOKEN", "rgpu_wrong")
    code, _, err = rgpu("status")
    assert code == 1 and "refused the token" in err and err.count("\n") == 1
    code, _, err = rgpu("submit", script(tmp_path, "print(1)"))
    assert code == 1 and "refused the token" in err
    code, _, err = rgpu("jobs", "--url", "ws://127.0.0.1:9")
    assert code == 1 and "cannot reach" in err
