"""Every benchmark in ``bench/`` still runs: each one's ``--smoke`` mode, as a subprocess.

A smoke run is a few rounds of small sizes (see ``bench/reporting.py``): its
figures mean nothing and no target is judged, but a change that breaks a
benchmark (a renamed API, a server that no longer gets ready, a notice
whose words changed) fails here. Every script in ``bench/`` with a
``__main__`` is run, a new one too; one without ``--smoke`` fails.

The Ray benchmark runs against the session's Ray cluster (``ray_cluster``
in conftest: already up when the Ray tests ran) rather than starting one
of its own; the store benchmark needs PostgreSQL, and skips (fails in CI)
without it, as the PostgreSQL tests do.

The runs spend most of their time starting servers, kernels and clusters,
waiting as much as computing: the others than Ray's run two at a time
(``smoke_runs``), and each test takes its own run's outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import postgres as pg

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: What a smoke run prints last (``bench/reporting.py``'s SMOKE_NOTE).
SMOKE_NOTE = "smoke run (--smoke)"
#: Seconds a smoke run may take: far more than the 5 to 40 it takes here even
#: on a busy machine; a run past it is stopped and fails.
TIMEOUT = 240
#: Seconds a stopped run has to end its servers before it is killed.
STOPPING = 60


def benchmarks() -> list[str]:
    """The scripts in ``bench/``: every module there that runs as a program."""
    return sorted(path.name for path in BENCH.glob("*.py")
                  if 'if __name__ == "__main__":' in path.read_text())


def smoke(script: str, *args: str, timeout: float = TIMEOUT) -> str:
    """Run ``bench/script --smoke args``; its output (stdout and stderr), or a failure that shows it.

    A run past ``timeout`` gets Ctrl-C (SIGINT), so that it stops the servers
    it started, and a minute later SIGKILL to its whole process group.
    """
    # Its servers' warm workers import nothing before their lease, as the suite's
    # do (tests/servers.py): a smoke run's figures mean nothing anyway.
    proc = subprocess.Popen([sys.executable, str(BENCH / script), "--smoke", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=BENCH.parent, start_new_session=True,
                            env=dict(os.environ, RGPU_PRELOAD="none"))
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=STOPPING)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise AssertionError(f"{script} --smoke ran past {timeout:g} s:\n{output[-6000:]}") from None
    assert proc.returncode == 0, f"{script} --smoke exited with {proc.returncode}:\n{output[-6000:]}"
    assert SMOKE_NOTE in output, f"{script} --smoke did not say it was a smoke run:\n{output[-3000:]}"
    return output


#: Benchmarks that need more than this machine: run by tests of their own below.
SPECIAL = {"bench_ray.py", "bench_store.py"}
#: The others.
PLAIN = [b for b in benchmarks() if b not in SPECIAL]
#: Smoke runs at once.
AT_ONCE = 2


@pytest.fixture(scope="module")
def smoke_runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Future[str]]]:
    """The smoke runs of the selected tests below (the store's where PostgreSQL runs),
    started in the tests' order, ``AT_ONCE`` at a time: each one's output, or its failure."""
    selected = {item.name for item in request.session.items if item.path == Path(__file__)}
    scripts = [script for script in PLAIN if f"test_smoke[{script}]" in selected]
    if "test_smoke_store" in selected and pg.unavailable() is None:
        scripts.append("bench_store.py")
    with ThreadPoolExecutor(AT_ONCE, thread_name_prefix="smoke") as pool:
        yield {script: pool.submit(smoke, script) for script in scripts}


def test_the_benchmarks_with_needs_are_still_there() -> None:
    assert SPECIAL <= set(benchmarks()), "rename them here too, or they are not run"


# A test waits for its own run only: the runs before it have ended, so its own has started.
@pytest.mark.timeout(TIMEOUT + STOPPING + 30)
@pytest.mark.parametrize("script", PLAIN)
def test_smoke(script: str, smoke_runs: dict[str, Future[str]]) -> None:
    smoke_runs[script].result()


@pytest.mark.timeout(TIMEOUT + STOPPING + 30)
def test_smoke_store(smoke_runs: dict[str, Future[str]]) -> None:
    pg.require()
    output = smoke_runs["bench_store.py"].result()
    assert "trivial cell `1+1` round trip" in output


@pytest.mark.timeout(2 * TIMEOUT + STOPPING + 180)  # and the Ray cluster's start, where this test is first
def test_smoke_ray(ray_cluster: object) -> None:
    # Ray workers start slower than local ones: four of them here, one per GPU of the cluster.
    output = smoke("bench_ray.py", "--ray", getattr(ray_cluster, "address"), timeout=2 * TIMEOUT)
    assert "lease of a warm worker" in output
