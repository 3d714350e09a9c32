"""The HTTP API on the websocket's port: shapes, tokens, who sees what."""

from __future__ import annotations

import socket
import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_kernel import AuthenticationError, Client
from remote_gpu_kernel.api import ApiClient, ApiError, http_url
from stores import BlockingStore
from postgres import BACKENDS
from servers import ServerProcess
from waiting import wait_for


class Users:
    """A started server and API clients for alice, bob and an admin (root)."""

    def __init__(self, server: ServerProcess) -> None:
        tokens = server.token("alice"), server.token("bob"), server.token("root", "--admin")
        self.server = server.start()
        self.alice, self.bob, self.admin = (ApiClient(server.url, t) for t in tokens)


@pytest.fixture(scope="module", params=BACKENDS)
def users(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Users]:
    """The module's server, once with each store backend."""
    with contextlib.ExitStack() as stack:
        db = None
        if request.param == "postgres":
            db = stack.enter_context(request.getfixturevalue("postgres").database())
        proc = ServerProcess(tmp_path_factory.mktemp("http"), "cpu:2", "--price-per-gpu-hour", "3.6", db=db)
        made = Users(proc)
        yield made
        proc.stop()


def raw(server: ServerProcess, path: str, token: str | None = None,
        method: str = "GET") -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(http_url(server.url) + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)



def test_status_shape(users: Users) -> None:
    status = users.alice.status()
    assert set(status) >= {"server", "you", "slots", "queue", "sessions", "usage"}
    assert status["server"]["version"]
    assert status["you"] == {"user": "alice", "admin": False}
    assert [s["id"] for s in status["slots"]] == ["cpu0", "cpu1"]
    for slot in status["slots"]:
        assert set(slot) >= {"id", "kind", "name", "uuid", "healthy", "pool", "readings", "holder"}
        assert slot["kind"] == "cpu" and slot["healthy"] is True and slot["pool"] == "default"
        assert set(slot["readings"]) == {"utilization", "memory_used", "memory_total", "temperature",
                                         "power", "processes", "host_memory_total"}
    assert status["usage"]["price_per_gpu_hour"] == 3.6
    assert users.admin.status()["you"] == {"user": "root", "admin": True}


def test_cpu_readings_show_the_warm_workers_and_their_pids_to_an_admin_only(users: Users) -> None:
    def read(api: ApiClient) -> list[dict[str, Any]] | None:
        slots = api.status()["slots"]
        ok = all(s["readings"]["processes"] and s["readings"]["memory_used"] for s in slots)
        return slots if ok else None

    slots = wait_for(lambda: read(users.admin), what="readings of the warm workers")
    for slot in slots:
        r = slot["readings"]
        assert r["memory_total"] > r["memory_used"] > 10_000_000  # an ipykernel is tens of MB
        assert r["temperature"] is None and r["power"] is None
        assert all(p["pid"] > 0 and p["memory"] > 0 for p in r["processes"])
    for slot in wait_for(lambda: read(users.alice), what="readings of the warm workers"):
        assert all(p["pid"] is None and p["memory"] > 0 for p in slot["readings"]["processes"])


def test_status_says_which_slots_have_a_warm_worker(users: Users) -> None:
    def warm() -> dict[str, bool]:
        return {s["id"]: s["warm"] for s in users.alice.status()["slots"]}

    wait_for(lambda: all(warm().values()), what="a warm worker on every slot")
    with Client(users.server.url, users.server.token("dave")).session() as session:
        held = users.alice.status()["slots"]
        taken = next(s["id"] for s in held if s["holder"] is not None and s["holder"]["user"] == "dave")
        # The lease took that slot's warm worker; the other slot's still waits.
        assert warm() == {slot: slot != taken for slot in ("cpu0", "cpu1")}
        assert session.execute("1+1", on_output=lambda _: None).ok
    wait_for(lambda: all(warm().values()), what="a fresh warm worker after the release")


@pytest.mark.parametrize("token, reason", [
    (None, "missing token"),
    ("rgpu_not-a-real-token", "invalid token"),
])
def test_bad_tokens_get_401_with_a_reason(users: Users, token: str | None, reason: str) -> None:
    for path in ("/api/status", "/api/jobs", "/api/jobs/1"):
        code, body, headers = raw(users.server, path, token)
        assert code == 401
        assert reason in body["error"] and "\n" not in body["error"]
        assert headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(AuthenticationError, match=reason):
        ApiClient(users.server.url, token).status()


def test_revoked_token_gets_401(users: Users) -> None:
    token = users.server.token("carol")
    assert ApiClient(users.server.url, token).status()["you"]["user"] == "carol"
    store = BlockingStore(users.server.db)
    try:
        store.revoke_token(store.verify_token(token).id)
    finally:
        store.close()
    code, body, _ = raw(users.server, "/api/status", token)
    assert code == 401 and "revoked" in body["error"]


def test_unknown_endpoint_wrong_method_and_post_body(users: Users) -> None:
    token = users.alice.token
    assert raw(users.server, "/api/nothing", token)[0] == 404
    code, body, _ = raw(users.server, "/api/status", token, method="POST")
    assert code == 405 and "GET" in body["error"]
    code, body, _ = raw(users.server, "/api/jobs", token, method="POST")
    assert code == 400 and "websocket" in body["error"]
    assert raw(users.server, "/api/jobs?state=bogus", token)[0] == 400
    assert raw(users.server, "/api/jobs/1/output?after=x", token)[0] in (400, 404)


def test_submit_refuses_bad_jobs(users: Users) -> None:
    with pytest.raises(ApiError, match="'code'"):
        users.alice.submit("   ")
    with pytest.raises(ApiError, match="can never run"):
        users.alice.submit("print(1)", gpus=3)
    with pytest.raises(ApiError, match="priority"):
        users.alice.submit("print(1)", priority="urgent")
    with pytest.raises(ApiError, match="no pool 'nowhere'"):
        users.alice.submit("print(1)", pool="nowhere")
    with pytest.raises(AuthenticationError):
        ApiClient(users.server.url, "rgpu_wrong").submit("print(1)")


def test_visibility_of_leases_queue_and_jobs(users: Users) -> None:
    """Bob sees alice's lease and queue entry but none of her ids, code or output."""
    alice_session = Client(users.server.url, users.alice.token).session()
    try:
        long = users.alice.submit("import time\nprint('secret output')\ntime.sleep(120)", name="long")
        wait_for(lambda: users.alice.job(long["id"])["state"] == "running", what="the long job to run")
        queued = users.alice.submit("print('queued secret')", name="waits")
        mine = users.bob.submit("print('bob was here')", name="bobs")

        def queue_of(client: ApiClient) -> list[dict[str, Any]]:
            return list(client.status()["queue"])

        queue = wait_for(lambda: len(queue_of(users.bob)) == 2 and queue_of(users.bob), what="two queued")
        by_user = {q["user"]: q for q in queue}
        assert sorted(q["position"] for q in queue) == [1, 2]
        assert by_user["alice"]["mine"] is False and by_user["bob"]["mine"] is True
        assert by_user["alice"]["job"] is None and by_user["bob"]["job"] == mine["id"]
        assert by_user["alice"]["waited"] >= 0 and by_user["alice"]["priority"] == "normal"
        assert by_user["alice"]["gpus"] == 1 and by_user["alice"]["pool"] == "default"
        assert {q["user"]: q["job"] for q in queue_of(users.alice)} == {"alice": queued["id"], "bob": None}
        assert {q["user"]: q["job"] for q in queue_of(users.admin)} == {"alice": queued["id"],
                                                                       "bob": mine["id"]}

        assert 'rgpu_queue_length{pool="default",priority="normal"} 2.0' in users.bob.metrics()

        bob_view = users.bob.status()
        holders = {s["id"]: s["holder"] for s in bob_view["slots"]}
        assert all(h is not None and h["user"] == "alice" and not h["mine"] for h in holders.values())
        assert all("session" not in h for h in holders.values())
        assert {s["user"] for s in bob_view["sessions"]} == {"alice"}
        assert all(s["id"] is None and not s["mine"] for s in bob_view["sessions"])
        alice_view = users.alice.status()
        assert alice_session.id in {s["id"] for s in alice_view["sessions"]}
        assert alice_session.id in {h["holder"].get("session") for h in alice_view["slots"]}
        assert alice_session.id in {s["id"] for s in users.admin.status()["sessions"]}

        # Another user's job is not found, whatever the verb; an admin's token sees it.
        for path, method in [(f"/api/jobs/{long['id']}", "GET"), (f"/api/jobs/{long['id']}/output", "GET"),
                             (f"/api/jobs/{long['id']}/cancel", "POST")]:
            code, body, _ = raw(users.server, path, users.bob.token, method)
            assert code == 404 and "secret" not in json.dumps(body)
        assert "secret output" in users.admin.job(long["id"])["code"]
        assert {j["user"] for j in users.bob.jobs()} == {"bob"}
        with pytest.raises(ApiError) as refused:
            users.bob.jobs(user="alice")
        assert refused.value.status == 403
        assert {j["id"] for j in users.admin.jobs(user="alice", kind="batch")} >= {long["id"], queued["id"]}
        assert all("code" not in j for j in users.alice.jobs())

        # Bob cannot release alice's session; alice can, and the queue moves.
        code, _, _ = raw(users.server, f"/api/sessions/{alice_session.id}/release", users.bob.token, "POST")
        assert code == 404
        assert users.alice.release(alice_session.id)["released"] is True
        assert users.alice.cancel(long["id"])["state"] == "cancelled"
        wait_for(lambda: users.alice.job(queued["id"])["state"] == "completed", what="the queued job")
        wait_for(lambda: users.bob.job(mine["id"])["state"] == "completed", what="bob's job")
        out = users.bob.output(mine["id"])
        assert "".join(o["text"] for o in out["outputs"]) == "bob was here\n" and out["done"]
    finally:
        alice_session.close()


def test_jobs_say_how_many_and_a_release_says_where_it_was_asked_from(users: Users) -> None:
    carol = users.server.token("carol")  # a user of this test's own: her jobs are counted
    with Client(users.server.url, carol).session() as session:
        for n in range(3):
            assert session.execute(f"x = {n}", on_output=lambda _: None).ok
        code, body, _ = raw(users.server, "/api/jobs?limit=2", carol)
        assert code == 200 and len(body["jobs"]) == 2 and body["total"] == 3
        assert raw(users.server, "/api/jobs?kind=batch", carol)[1]["total"] == 0
        code, body, _ = raw(users.server, f"/api/sessions/{session.id}/release?via=mars", carol, "POST")
        assert code == 400 and "unknown via 'mars'" in body["error"]
        assert session.execute("print(x)", on_output=lambda _: None).stdout == "2\n", "a refused release left it"
        code, body, _ = raw(users.server, f"/api/sessions/{session.id}/release?via=sidebar", users.admin.token,
                            "POST")
        assert code == 200 and body["reason"] == "released from the Remote GPU sidebar by root"
        assert wait_for(lambda: session.released, what="the release to reach the client") == body["reason"]


def test_cancel_a_running_cell(users: Users) -> None:
    session = Client(users.server.url, users.alice.token).session()
    results: list[Any] = []
    began = threading.Event()  # the cell runs in its kernel: an interrupt now reaches it
    runner = threading.Thread(target=lambda: results.append(
        session.execute("import time; print('began', flush=True); time.sleep(120)", on_output=lambda _: began.set())))
    runner.start()
    try:
        assert began.wait(60), "the cell did not begin"
        cells = wait_for(lambda: users.alice.jobs(kind="cell", state="running"), what="a running cell")
        cell = cells[0]["id"]
        assert raw(users.server, f"/api/jobs/{cell}/cancel", users.bob.token, "POST")[0] == 404
        users.alice.cancel(cell)
        runner.join(60)
        assert not runner.is_alive()
        assert wait_for(lambda: users.alice.job(cell)["state"] != "running" and users.alice.job(cell),
                        what="the cell to end")["state"] == "cancelled"
        with pytest.raises(ApiError, match="already ended") as ended:
            users.alice.cancel(cell)
        assert ended.value.status == 409
    finally:
        session.close()


def test_usage_counts_gpu_seconds_and_cost(users: Users) -> None:
    job = users.bob.submit("import time; time.sleep(1.5)", name="paid")
    done = wait_for(lambda: (j := users.bob.job(job["id"]))["state"] == "completed" and j,
                    what="the paid job")
    assert 1.4 <= done["gpu_seconds"] <= 30
    assert done["cost"] == pytest.approx(done["gpu_seconds"] / 3600 * 3.6, abs=1e-3)
    usage = users.bob.usage()
    assert usage["you"]["user"] == "bob" and usage["you"]["gpu_seconds"] >= done["gpu_seconds"]
    assert usage["you"]["cost"] == pytest.approx(usage["you"]["gpu_seconds"] / 1000, abs=1e-3)
    assert users.bob.status()["usage"]["price_per_gpu_hour"] == 3.6


def test_metrics(users: Users) -> None:
    text = users.alice.metrics()
    assert 'rgpu_slots_free{pool="default"}' in text
    node = socket.gethostname()
    assert f'rgpu_slot_healthy{{node="{node}",slot="cpu0"}} 1.0' in text
    assert f'rgpu_slot_utilization_percent{{kind="cpu",node="{node}",slot="cpu0"}}' in text
    assert "rgpu_lease_wait_seconds_bucket" in text
    assert 'rgpu_leases_granted_total{kind="batch",pool="default"}' in text
    assert 'rgpu_jobs{kind="batch",state="completed"}' in text
    assert "alice" not in text and "bob" not in text


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ApiError, match="cannot reach") as caught:
        ApiClient("ws://127.0.0.1:9", "rgpu_x").status()
    assert caught.value.status == 0
