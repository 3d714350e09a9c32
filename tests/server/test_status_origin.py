"""What the sidebar shows of a lease and a job (its notebook, its first line),
each slot's recent history, and a CPU slot's memory share, through the
real server's HTTP API."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from remote_gpu_kernel import Client
from remote_gpu_kernel.api import ApiClient
from remote_gpu_core.ids import SessionId
from remote_gpu_server.frontdoor.status import FIRST_LINE_MAX, first_line
from servers import ServerProcess
from stores import BlockingStore
from waiting import wait_for


class Users:
    def __init__(self, server: ServerProcess) -> None:
        self.tokens = server.token("alice"), server.token("bob"), server.token("root", "--admin")
        self.server = server.start()
        self.alice, self.bob, self.admin = (ApiClient(server.url, t) for t in self.tokens)


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    proc = ServerProcess(tmp_path_factory.mktemp("origin"), "cpu:2")
    made = Users(proc)
    yield made
    proc.stop()



@pytest.mark.parametrize("code, line", [
    ("print(1)", "print(1)"),
    ("\n\n   # train the model  \nmodel.fit()", "# train the model"),
    ("x = 1\r\ny = 2", "x = 1"),
    ("", None),
    (" \n\t\n", None),
    (None, None),
    ("y = " + "9" * 200, "y = " + "9" * (FIRST_LINE_MAX - 5) + "…"),
])
def test_first_line(code: str | None, line: str | None) -> None:
    assert first_line(code) == line
    assert line is None or len(line) <= FIRST_LINE_MAX


def test_a_lease_and_its_jobs_name_the_notebook_and_first_line_to_their_owner(users: Users) -> None:
    notebook = "/home/alice/projects/vision/train model.ipynb"
    with Client(users.server.url, users.tokens[0]).session(notebook=notebook) as session:
        result = session.execute("  \n\ntotal = 40 + 2   \nprint(total)", on_output=lambda msg: None)
        assert result.status == "ok"

        mine = users.alice.status()
        (lease,) = [s for s in mine["sessions"] if s["id"] == session.id]
        assert lease["notebook"] == notebook and lease["first_line"] == "total = 40 + 2"
        assert lease["busy"] is False and lease["mine"] is True
        (slot,) = [s for s in mine["slots"] if s["id"] in lease["slots"]]
        assert slot["holder"]["notebook"] == notebook

        (job,) = [j for j in users.alice.jobs() if j["id"] == result.job]
        assert job["notebook"] == notebook and job["first_line"] == "total = 40 + 2"
        assert users.alice.job(result.job)["notebook"] == notebook

        # Another user sees that alice holds a slot, not what she runs or from where.
        theirs = users.bob.status()
        (lease,) = [s for s in theirs["sessions"] if s["user"] == "alice"]
        assert lease["notebook"] is None and lease["first_line"] is None and lease["id"] is None
        (slot,) = [s for s in theirs["slots"] if s["holder"] and s["holder"]["user"] == "alice"]
        assert "notebook" not in slot["holder"]
        (lease,) = [s for s in users.admin.status()["sessions"] if s["user"] == "alice"]
        assert lease["notebook"] == notebook


def test_a_script_names_no_notebook(users: Users, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API sends a notebook only when told, even inside a kernel's environment."""
    monkeypatch.setenv("JPY_SESSION_NAME", "/somewhere/else.ipynb")
    with Client(users.server.url, users.tokens[0]).session() as session:
        job = session.execute("x = 1", on_output=lambda msg: None).job
        (lease,) = [s for s in users.alice.status()["sessions"] if s["id"] == session.id]
        assert lease["notebook"] is None and lease["first_line"] == "x = 1"
    (record,) = [j for j in users.alice.jobs() if j["id"] == job]
    assert record["notebook"] is None and record["first_line"] == "x = 1"


def test_a_batch_job_shows_the_first_line_of_its_script(users: Users) -> None:
    job = users.alice.submit("\n# nightly\nimport time\ntime.sleep(60)\n", name="nightly")
    try:
        def lease() -> dict[str, Any] | None:
            found = [s for s in users.alice.status()["sessions"] if s["job"] == job["id"]]
            return found[0] if found else None

        running = wait_for(lease, what="the batch job's lease")
        assert running["kind"] == "batch" and running["first_line"] == "# nightly"
        assert running["notebook"] is None and running["busy"] is True
        (record,) = [j for j in users.alice.jobs() if j["id"] == job["id"]]
        assert record["first_line"] == "# nightly" and record["notebook"] is None
    finally:
        users.alice.cancel(job["id"])


def test_another_users_workers_pids_are_shown_to_an_admin_only(users: Users) -> None:
    # A pid is what a cell needs to aim at another user's worker (signals,
    # /proc): bob sees that alice's slot is busy and how much it holds, not her pids.
    with Client(users.server.url, users.tokens[0]).session() as session:
        pid = int(session.execute("import os; print(os.getpid())", on_output=lambda _: None).stdout)

        def shown(api: ApiClient) -> list[Any]:
            return [p["pid"] for s in api.status()["slots"] for p in s["readings"]["processes"]]

        wait_for(lambda: pid in shown(users.admin), timeout=30, what="the admin to see alice's worker")
        for api in (users.bob, users.alice):
            pids = shown(api)
            assert pids and set(pids) == {None}
            assert list(named_pids(api.status())) == [None] * len(pids)  # nowhere else either


def named_pids(value: Any) -> Iterator[Any]:
    """Every value under a key named ``pid``, and every item under ``pids``, in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "pid":
                yield item
            elif key == "pids":
                yield from item
            else:
                yield from named_pids(item)
    elif isinstance(value, list):
        for item in value:
            yield from named_pids(item)


def test_each_slot_has_a_growing_history_of_readings(users: Users) -> None:
    def two_points() -> list[dict[str, Any]] | None:
        slots = users.alice.status()["slots"]
        return slots if all(len(s["history"]["time"]) >= 2 for s in slots) else None

    slots = wait_for(two_points, timeout=30, what="two readings of every slot")
    for slot in slots:
        history = slot["history"]
        assert history["window"] > 0
        times = history["time"]
        assert len(history["utilization"]) == len(history["memory_used"]) == len(times)
        assert times == sorted(times) and times[-1] - times[0] <= history["window"]
        assert all(isinstance(u, (int, float)) for u in history["utilization"])
        assert all(isinstance(m, int) for m in history["memory_used"])


def test_a_cpu_slot_reports_its_share_of_the_host_memory(users: Users) -> None:
    host = psutil.virtual_memory().total
    for slot in users.alice.status()["slots"]:
        readings = slot["readings"]
        assert readings["host_memory_total"] == host
        assert readings["memory_total"] == host // 2  # two CPU slots share the host


def test_an_older_store_file_gains_the_notebook_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the sessions table as it was before notebooks
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
                   "created REAL NOT NULL)")
        db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, user_id INTEGER NOT NULL "
                   "REFERENCES users(id), slots TEXT NOT NULL, created REAL NOT NULL, released REAL, "
                   "reason TEXT)")
        db.execute("INSERT INTO users (name, created) VALUES ('alice', 0)")
        db.execute("INSERT INTO sessions (id, user_id, slots, created) VALUES ('old', 1, 'cpu0', 0)")
    store = BlockingStore(path)
    try:
        old = store.create_job("alice", SessionId("old"), "a = 1", ["cpu0"])
        store.create_session(SessionId("new"), "alice", ["cpu0"], "nb.ipynb")
        new = store.create_job("alice", SessionId("new"), "b = 2", ["cpu0"])
        assert store.job(old).notebook is None and store.job(new).notebook == "nb.ipynb"
        assert {j.id: j.notebook for j in store.jobs(user="alice")} == {old: None, new: "nb.ipynb"}
    finally:
        store.close()
