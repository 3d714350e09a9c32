"""``rgpu serve --keep-output DAYS``: old output is pruned in the background, usage stays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from postgres import BACKENDS
from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient
from remote_gpu_server.store.retention import prune_period
from servers import ServerProcess


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_old_output_is_pruned_and_jobs_and_usage_stay(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--keep-output", "0.00002"]  # 1.7 s: rounds every second
    token = fresh_server.token("alice")
    fresh_server.start()
    api = ApiClient(fresh_server.url, token)
    with Client(fresh_server.url, token).session() as session:
        job = session.execute("print('old output')", on_output=lambda _: None).job
    assert "old output" in "".join(o.get("text", "") for o in api.outputs(job))
    usage = api.usage()
    cli = [sys.executable, "-m", "remote_gpu_kernel.cli", "usage", "--url", fresh_server.url, "--token", token]
    table = subprocess.run(cli, check=True, capture_output=True, text=True).stdout

    fresh_server.wait_for_log(r"pruned \d+ output row\(s\) of sessions released more than 2e-05 day")
    assert api.outputs(job) == []
    assert api.job(job)["state"] == "completed"  # the job stays, its output is gone
    assert api.usage()["total"] == usage["total"] and api.usage()["users"] == usage["users"]
    assert subprocess.run(cli, check=True, capture_output=True, text=True).stdout == table
    fresh_server.stop()


def test_keep_output_must_be_a_positive_number_of_days(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0", "--db",
                           str(tmp_path / "rgpu.sqlite3"), "--keep-output", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == "rgpu serve: --keep-output needs a number of days above 0"


def test_rounds_are_a_tenth_of_what_is_kept_within_a_second_and_an_hour() -> None:
    assert prune_period(0.00001) == 1.0
    assert prune_period(0.1) == pytest.approx(864.0)
    assert prune_period(30) == 3600.0
