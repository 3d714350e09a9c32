"""Two servers share one PostgreSQL database: a restart recovers only its own work."""

from __future__ import annotations

import threading
from pathlib import Path

import postgres as pg
from remote_gpu_kernel import Client
from remote_gpu_kernel.sync import Session
from remote_gpu_kernel.api import ApiClient
from remote_gpu_core.protocol import messages as m
from servers import ServerProcess
from stores import BlockingStore, execute_raw
from waiting import wait_for

#: The cells wait for a file in the test's folder, which an isolated worker (its
#: own /tmp) could not see: these servers run their workers unisolated.
SHARED = ("--no-isolation",)
#: A cell that runs until the file FLAG exists.
UNTIL = "import os, time\nprint('{name} runs', flush=True)\nwhile not os.path.exists({flag!r}):\n    time.sleep(0.05)\n"



def start_cell(server: ServerProcess, token: str, name: str, flag: Path) -> tuple[Session, dict[str, object]]:
    """Run UNTIL on a session of ``server`` in a thread; wait until it printed."""
    received: list[m.Output] = []
    outcome: dict[str, object] = {}
    session = Client(server.url, token).session()

    def run() -> None:
        try:
            outcome["result"] = session.execute(UNTIL.format(name=name, flag=str(flag)), on_output=received.append)
        except Exception as exc:  # the server was killed under it
            outcome["error"] = exc

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: any(o.msg_type == "stream" for o in received), what=f"{name}'s cell to start")
    return session, outcome


def test_a_restarted_server_recovers_only_its_own_work(postgres: pg.PostgresCluster, tmp_path: Path) -> None:
    with postgres.database() as url:
        a = ServerProcess(tmp_path, "cpu:1", "--server-id", "a", *SHARED, db=url)
        b = ServerProcess(tmp_path, "cpu:1", "--server-id", "b", *SHARED, db=url)
        token = a.token("alice")
        a.start()
        b.start()
        again: ServerProcess | None = None
        try:
            flag = tmp_path / "done"
            start_cell(a, token, "a", flag)
            b_session, b_outcome = start_cell(b, token, "b", flag)
            queued = ApiClient(b.url, token).submit("print('b ran me')", name="b's batch")  # b's slot is busy
            assert queued["state"] == "queued"

            a.kill()  # no clean shutdown: a's cell stays 'running' in the store
            again = ServerProcess(tmp_path, "cpu:1", "--server-id", "a", *SHARED, db=url).start()
            again.wait_for_log("marked 1 job")
            with BlockingStore(url) as store:
                cells = {j.code.split("'")[1]: j for j in store.jobs(kind="cell")}
                assert cells["a runs"].state == "failed" and "server stopped" in str(cells["a runs"].error)
                assert cells["b runs"].state == "running"  # b's, untouched
                assert store.job(queued["id"]).state == "queued"  # a free slot on a, but b's job
                assert len(store.open_sessions()) == 1  # b's; a's ended with its cell

            flag.touch()  # b's cell ends, its lease too; b runs its queued job
            wait_for(lambda: "result" in b_outcome, what="b's cell to end")
            b_session.release()
            api = ApiClient(b.url, token)
            wait_for(lambda: api.job(queued["id"])["state"] == "completed", what="b's batch job")
            assert "".join(o["text"] for o in api.outputs(queued["id"])) == "b ran me\n"
            assert execute_raw(url, "SELECT server_id FROM jobs WHERE id = ?", (queued["id"],)) == [("b",)]
        finally:
            for server in (again, b):
                if server is not None:
                    server.stop()
