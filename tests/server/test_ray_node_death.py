"""A node of the Ray cluster dies under a server that is the cluster's head.

The server is this module's own (not the shared ``ray_server``), so that
the GPUs it holds are all it can lease; the test adds a node back before it
ends, so the cluster has two nodes again for whoever comes next.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_kernel import Client, SessionReleased, WorkerDied
from remote_gpu_kernel.api import ApiClient
from servers import ray_head as head

pytestmark = pytest.mark.timeout(300)

WHERE = "import os; print(os.environ['RGPU_SLOTS'])"


def node_of(session: Any) -> str:
    return str(session.execute(WHERE, on_output=lambda _: None).stdout.split("/")[0])


def test_a_node_that_dies_ends_its_sessions_clearly_and_the_rest_go_on(
        ray_cluster: Any, tmp_path: Path) -> None:
    server = head(tmp_path, ray_cluster)
    try:
        tokens = [server.token(user) for user in ("alice", "bob", "carol", "dave", "erin")]
        sessions = [Client(server.url, token).session() for token in tokens[:4]]
        nodes = {s.id: node_of(s) for s in sessions}
        doomed_node = nodes[sessions[0].id]
        doomed = [s for s in sessions if nodes[s.id] == doomed_node]
        survivors = [s for s in sessions if nodes[s.id] != doomed_node]
        assert len(doomed) == 2 and len(survivors) == 2
        outcome: list[BaseException] = []
        running = threading.Event()

        def long_cell() -> None:
            try:
                doomed[0].execute("import time\nprint('running', flush=True)\ntime.sleep(120)",
                                  on_output=lambda _: running.set())
            except BaseException as exc:
                outcome.append(exc)

        runner = threading.Thread(target=long_cell)
        runner.start()
        assert running.wait(60), "the long cell did not start"
        killed_at = time.monotonic()
        ray_cluster.remove_node(ray_cluster.node_of(doomed_node))
        runner.join(60)
        assert outcome and isinstance(outcome[0], WorkerDied), outcome
        assert time.monotonic() - killed_at < 30
        assert "went away" in str(outcome[0]) and "node" in str(outcome[0])
        with pytest.raises(SessionReleased, match="went away"):
            doomed[0].execute("1", on_output=lambda _: None)
        # The other node goes on, and the queue with it.
        assert survivors[0].execute("21 * 2", on_output=lambda _: None).ok
        api = ApiClient(server.url, tokens[0])
        job = api.jobs(state="failed")[0]
        assert "went away" in (job.get("error") or "")
        status = api.status()
        down = [s for s in status["slots"] if s["id"].startswith(doomed_node)]
        assert down and not any(s["healthy"] for s in down)
        assert all("is down" in (s["problem"] or "") for s in down)
        waiting: list[Any] = []
        waiter = threading.Thread(target=lambda: waiting.append(Client(server.url, tokens[4]).session()))
        waiter.start()
        freed = survivors.pop()
        slot = freed.slots[0]
        freed.release()
        waiter.join(60)
        assert waiting and waiting[0].slots == [slot]
        survivors.append(waiting[0])
    finally:
        ray_cluster.add_node()  # the cluster has two nodes again for whoever comes next
        for session in locals().get("survivors", []):
            session.release()
        server.stop()
