"""Batch jobs on a real server: states, output, timeouts, retries, cancels, restarts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_kernel.api import ApiClient
from postgres import BACKENDS
from servers import ServerProcess
from waiting import wait_for

#: Seconds a test waits for a job to reach a state (the machine is small and shared).
PATIENCE = 90

LONG = "import time\nprint('started', flush=True)\ntime.sleep(300)\n"
DEAF = (  # ignores SIGINT, so only a kill stops it
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "print('deaf', flush=True)\ntime.sleep(300)\n"
)


def start(server: ServerProcess, slots: str = "cpu:1") -> ApiClient:
    server.slots = slots
    token = server.token("alice")
    server.start()
    return ApiClient(server.url, token)


def wait_state(api: ApiClient, job: int, *states: str, timeout: float = PATIENCE) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        seen.update(api.job(job))
        return dict(seen) if seen["state"] in states else None

    try:
        return wait_for(reached, timeout, f"job {job} in {states}", every=0.25)
    except AssertionError:
        raise AssertionError(f"job {job} did not reach {states}: {seen}") from None


def wait_queued(api: ApiClient, jobs: list[int]) -> list[int]:
    """The jobs in the server's queue, in its order, once all of ``jobs`` are in it."""
    def order() -> list[int] | None:
        queue = [q["job"] for q in api.status()["queue"]]
        return queue if set(jobs) <= set(queue) else None

    return wait_for(order, PATIENCE, f"jobs {jobs} in the queue")


def text(api: ApiClient, job: int) -> str:
    return "".join(o["text"] for o in api.outputs(job))


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_submit_logs_complete_and_output_survives_a_restart(fresh_server: ServerProcess,
                                                            tmp_path: Path) -> None:
    api = start(fresh_server)
    job = api.submit("for i in range(3):\n    print('line', i)\n", name="hello")
    assert job["state"] == "queued" and job["kind"] == "batch" and job["name"] == "hello"
    done = wait_state(api, job["id"], "completed", "failed")
    assert done["state"] == "completed" and done["error"] is None
    assert [a["state"] for a in done["attempts"]] == ["completed"]
    assert text(api, job["id"]) == "line 0\nline 1\nline 2\n"
    outputs = list(api.follow(job["id"], poll=0.1))
    assert "".join(o["text"] for o in outputs) == "line 0\nline 1\nline 2\n"
    seqs = [o["seq"] for o in outputs]  # execute_input, then the stream
    first = api.output(job["id"], limit=1)
    assert first["more"] and not first["done"] and first["last_seq"] == seqs[0]
    last = api.output(job["id"], after=seqs[-2], limit=1)
    assert not last["more"] and last["done"] and last["last_seq"] == seqs[-1]
    failing = api.submit("raise ValueError('bad input')", retries=3)
    failed = wait_state(api, failing["id"], "failed", "completed")
    assert failed["error"] == "ValueError: bad input"
    assert len(failed["attempts"]) == 1  # an exception in the script is not retried
    assert "ValueError" in text(api, failing["id"])

    fresh_server.stop()
    again = ServerProcess(tmp_path, "cpu:1", db=fresh_server.db).start()
    try:
        api = ApiClient(again.url, api.token)
        assert text(api, job["id"]) == "line 0\nline 1\nline 2\n"
        assert api.job(job["id"])["state"] == "completed"
    finally:
        again.stop()


def test_timeout_interrupts_then_kills_and_the_slot_comes_back(fresh_server: ServerProcess) -> None:
    api = start(fresh_server)
    polite = api.submit(LONG, timeout=1.5)
    ended = wait_state(api, polite["id"], "timed_out", "completed", "failed")
    assert ended["state"] == "timed_out" and "timeout of 1.5 s" in ended["error"]
    assert "KeyboardInterrupt" in text(api, polite["id"])
    deaf = api.submit(DEAF, timeout=1.0)
    started = time.monotonic()
    ended = wait_state(api, deaf["id"], "timed_out", "completed", "failed")
    assert ended["state"] == "timed_out"
    assert time.monotonic() - started >= 1.0 + 4.0  # waited the kill grace (5 s) before the kill
    after = api.submit("print('slot is back')")
    assert wait_state(api, after["id"], "completed", "failed")["state"] == "completed"
    assert api.status()["slots"][0]["holder"] is None


def test_a_dead_worker_is_retried_with_each_attempt_visible(fresh_server: ServerProcess,
                                                            tmp_path: Path) -> None:
    # The script leaves a marker in the test's folder for its next attempt:
    # workers that are not isolated can reach it, isolated ones cannot.
    fresh_server.args = ["--no-isolation"]
    api = start(fresh_server)
    marker = tmp_path / "first-attempt-done"
    script = (
        "import os, pathlib, sys, time\n"
        "print('trying', flush=True)\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():\n"
        "    marker.write_text('x')\n"
        "    time.sleep(0.5)  # lets the kernel publish what was printed\n"
        "    os._exit(3)\n"
        "print('second attempt ran')\n"
    )
    job = api.submit(script, retries=2)
    done = wait_state(api, job["id"], "completed", "failed")
    assert done["state"] == "completed", done
    assert done["attempt"] == 2
    first, second = done["attempts"]
    assert first["state"] == "failed" and "exit code 3" in first["error"]
    assert second["state"] == "completed"
    assert second["started"] - first["ended"] >= 0.9  # the backoff before the first retry
    assert [(o["attempt"], o["text"]) for o in api.outputs(job["id"]) if o["text"]] == [
        (1, "trying\n"), (2, "trying\n"), (2, "second attempt ran\n")]

    no_retries = api.submit("import os; os._exit(3)")
    failed = wait_state(api, no_retries["id"], "failed", "completed")
    assert "exit code 3" in failed["error"] and len(failed["attempts"]) == 1


def test_cancel_queued_and_running_jobs(fresh_server: ServerProcess) -> None:
    api = start(fresh_server)
    running = api.submit(LONG)
    wait_state(api, running["id"], "running")
    queued = api.submit("print('never')")
    deaf = api.submit(DEAF)
    wait_queued(api, [queued["id"], deaf["id"]])
    assert api.cancel(queued["id"])["state"] == "cancelled"
    assert api.job(queued["id"])["attempts"] == []
    assert api.cancel(running["id"])["state"] == "cancelled"  # interrupted
    wait_state(api, deaf["id"], "running")
    wait_for(lambda: "deaf" in text(api, deaf["id"]), PATIENCE, "the deaf job's first line", every=0.2)
    started = time.monotonic()
    assert api.cancel(deaf["id"])["state"] == "cancelled"  # killed after the grace
    assert time.monotonic() - started >= 4.0
    with pytest.raises(Exception, match="already ended"):
        api.cancel(deaf["id"])
    after = api.submit("print('free again')")
    assert wait_state(api, after["id"], "completed", "failed")["state"] == "completed"
    assert text(api, queued["id"]) == ""


def test_restart_keeps_queued_jobs_in_order(fresh_server: ServerProcess, tmp_path: Path) -> None:
    api = start(fresh_server, "cpu:2")
    once = api.submit(LONG, name="once")            # running, no retries: fails at the restart
    again = api.submit(LONG, name="again", retries=1)  # running, retried after the restart
    wait_state(api, once["id"], "running")
    wait_state(api, again["id"], "running")
    queued = [api.submit(LONG, name=f"q{i}")["id"] for i in range(3)]
    assert wait_queued(api, queued) == queued
    fresh_server.stop()

    server = ServerProcess(tmp_path, "cpu:2", db=fresh_server.db).start()
    try:
        api = ApiClient(server.url, api.token)
        failed = api.job(once["id"])
        assert failed["state"] == "failed" and "server stopped" in failed["error"]
        assert wait_state(api, again["id"], "running")["attempt"] == 2
        wait_state(api, queued[0], "running")
        assert [q["job"] for q in api.status()["queue"]] == queued[1:]
        for job in (again["id"], *queued):
            api.cancel(job)
        assert {api.job(j)["state"] for j in queued} == {"cancelled"}
    finally:
        server.stop()
