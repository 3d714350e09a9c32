"""The sidebar's server extension against a real GPU server on CPU slots.

Requests go through a real Jupyter server (pytest-jupyter's ``jp_fetch``)
to the handlers under ``/remote-gpu/``, which call the GPU server's HTTP API
with the token from the environment or the config file.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPResponse

from remote_gpu_kernel import Client
from servers import ServerProcess
from waiting import wait_for

Fetch = Callable[..., Awaitable[HTTPResponse]]


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"remote_gpu_lab": True}}}


@pytest.fixture
def rgpu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No RGPU_URL/RGPU_TOKEN and a config file that does not exist yet."""
    monkeypatch.delenv("RGPU_URL", raising=False)
    monkeypatch.delenv("RGPU_TOKEN", raising=False)
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "rgpu-client.json"))
    return monkeypatch


@pytest.fixture
def configured(rgpu_env: pytest.MonkeyPatch, server: ServerProcess, alice: str) -> str:
    rgpu_env.setenv("RGPU_URL", server.url)
    rgpu_env.setenv("RGPU_TOKEN", alice)
    return alice


async def get_json(fetch: Fetch, *path: str, method: str = "GET") -> tuple[int, Any]:
    """Answer status and JSON body, for errors too."""
    try:
        response = await fetch("remote-gpu", *path, method=method,
                               **({"body": b""} if method == "POST" else {}))
    except HTTPClientError as exc:
        assert exc.response is not None, exc
        return exc.code, json.loads(exc.response.body)
    return response.code, json.loads(response.body)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_status_relays_the_gpu_servers_view(jp_fetch: Fetch, server: ServerProcess,
                                                  configured: str) -> None:
    code, body = await get_json(jp_fetch, "status")
    assert code == 200
    assert body["url"] == server.url
    status = body["status"]
    assert status["you"] == {"user": "alice", "admin": False}
    assert [s["id"] for s in status["slots"]] == ["cpu0", "cpu1"]
    for slot in status["slots"]:
        assert slot["kind"] == "cpu" and slot["healthy"] is True
        assert {"utilization", "memory_used", "memory_total"} <= set(slot["readings"])
    assert isinstance(status["queue"], list) and isinstance(status["sessions"], list)
    assert configured not in json.dumps(body), "the token must never reach the browser"


async def test_jobs_is_the_users_list_and_how_many_there_are(jp_fetch: Fetch, configured: str) -> None:
    code, body = await get_json(jp_fetch, "jobs")
    assert code == 200
    assert isinstance(body["jobs"], list) and isinstance(body["total"], int)
    assert body["total"] >= len(body["jobs"])
    assert all(job["user"] == "alice" for job in body["jobs"])


async def test_config_file_is_used_without_environment(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch,
                                                        tmp_path: Path, server: ServerProcess,
                                                        alice: str) -> None:
    (tmp_path / "rgpu-client.json").write_text(json.dumps({"url": server.url, "token": alice}))
    code, body = await get_json(jp_fetch, "status")
    assert code == 200, body
    assert body["status"]["you"]["user"] == "alice"


async def test_no_token_says_what_to_do(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch,
                                        server: ServerProcess) -> None:
    rgpu_env.setenv("RGPU_URL", server.url)
    code, body = await get_json(jp_fetch, "status")
    assert code == 503
    assert body["reason"] == "no-token"
    assert body["url"] == server.url
    assert "token" in body["message"].lower()
    assert "rgpu login" in body["hint"]
    assert "traceback" not in body


async def test_bad_token_is_not_a_jupyter_login_failure(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch,
                                                        server: ServerProcess) -> None:
    rgpu_env.setenv("RGPU_URL", server.url)
    rgpu_env.setenv("RGPU_TOKEN", "not-a-real-token")
    code, body = await get_json(jp_fetch, "status")
    assert code == 502
    assert body["reason"] == "unauthorized"
    assert "refused the token" in body["message"]
    assert "not-a-real-token" not in json.dumps(body)


async def test_unreachable_server(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch) -> None:
    url = f"ws://127.0.0.1:{_closed_port()}"
    rgpu_env.setenv("RGPU_URL", url)
    rgpu_env.setenv("RGPU_TOKEN", "whatever")
    code, body = await get_json(jp_fetch, "status")
    assert code == 502
    assert body["reason"] == "unreachable"
    assert url in body["message"]
    assert "rgpu serve" in body["hint"]
    code, body = await get_json(jp_fetch, "jobs")
    assert (code, body["reason"]) == (502, "unreachable")


async def test_bad_url(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch) -> None:
    rgpu_env.setenv("RGPU_URL", "localhost-without-scheme")
    rgpu_env.setenv("RGPU_TOKEN", "whatever")
    code, body = await get_json(jp_fetch, "status")
    assert (code, body["reason"]) == (500, "bad-url")


async def test_unknown_job_and_session(jp_fetch: Fetch, configured: str) -> None:
    code, body = await get_json(jp_fetch, "jobs", "999999", "cancel", method="POST")
    assert (code, body["reason"]) == (404, "not-found")
    assert "999999" in body["message"]
    code, body = await get_json(jp_fetch, "sessions", "abcdef0123", "release", method="POST")
    assert (code, body["reason"]) == (404, "not-found")
    code, body = await get_json(jp_fetch, "sessions", "abcdef0123", "restart", method="POST")
    assert (code, body["reason"]) == (404, "not-found")


async def test_handlers_need_a_jupyter_login(jp_serverapp: Any, jp_base_url: str,
                                             http_server_client: Any, configured: str) -> None:
    response = await http_server_client.fetch(f"{jp_base_url}remote-gpu/status", raise_error=False)
    assert response.code == 403
    assert b"cpu0" not in response.body


@pytest.fixture
def one_slot(fresh_server: ServerProcess) -> Iterator[ServerProcess]:
    yield fresh_server.start()
    fresh_server.stop()


async def test_restart_and_release_of_the_lease(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch,
                                       one_slot: ServerProcess) -> None:
    token = one_slot.token("bob")
    rgpu_env.setenv("RGPU_URL", one_slot.url)
    rgpu_env.setenv("RGPU_TOKEN", token)
    client = Client(one_slot.url, token)
    session = client.session()
    try:
        assert session.execute("x = 1").ok
        code, body = await get_json(jp_fetch, "status")
        assert code == 200
        slot = body["status"]["slots"][0]
        assert slot["holder"]["user"] == "bob" and slot["holder"]["mine"] is True
        assert slot["holder"]["session"] == session.id
        mine = [s for s in body["status"]["sessions"] if s["mine"]]
        assert [s["id"] for s in mine] == [session.id]

        code, body = await get_json(jp_fetch, "jobs")
        assert code == 200 and body["jobs"], "the executed cell is a job"
        assert body["jobs"][0]["state"] in ("completed", "running") and body["total"] == 1

        code, body = await get_json(jp_fetch, "sessions", session.id, "restart", method="POST")
        assert code == 200 and body["restarted"] is True, body
        assert body["reason"] == "restarted from the Remote GPU sidebar"
        assert session.execute("print('x' in globals())", on_output=lambda _: None).stdout == "False\n"

        code, body = await get_json(jp_fetch, "sessions", session.id, "release", method="POST")
        assert code == 200, body
        assert body["released"] is True
        # The notebook is told where it came from, not "by bob through the HTTP API".
        assert body["reason"] == "released from the Remote GPU sidebar"
        assert await asyncio.to_thread(wait_for, lambda: session.released, 30, "the notebook's notice") \
            == "released from the Remote GPU sidebar"

        code, body = await get_json(jp_fetch, "status")
        assert body["status"]["slots"][0]["holder"] is None
        assert not [s for s in body["status"]["sessions"] if s["mine"]]
    finally:
        session.close()


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


async def test_queue_position_and_cancel_of_a_running_cell(jp_fetch: Fetch, rgpu_env: pytest.MonkeyPatch,
                                                           one_slot: ServerProcess) -> None:
    bob, alice = one_slot.token("bob"), one_slot.token("alice")
    rgpu_env.setenv("RGPU_URL", one_slot.url)
    rgpu_env.setenv("RGPU_TOKEN", alice)
    holder = Client(one_slot.url, bob).session()
    waiting: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: waiting.setdefault("session", Client(one_slot.url, alice).session()))
    waiter.start()
    try:
        async def queued() -> bool:
            _, body = await get_json(jp_fetch, "status")
            return bool(body["status"]["queue"])

        await _until(queued)
        _, body = await get_json(jp_fetch, "status")
        [entry] = body["status"]["queue"]
        assert (entry["user"], entry["mine"], entry["position"]) == ("alice", True, 1)
        holder_json = body["status"]["slots"][0]["holder"]
        assert holder_json["user"] == "bob" and holder_json["mine"] is False
        assert "session" not in holder_json or holder_json["session"] is None, "another user's session id leaked"

        holder.release()
        await asyncio.to_thread(waiter.join, 30)
        session = waiting["session"]
        result: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: result.setdefault(
            "r", session.execute("import time\nfor _ in range(600): time.sleep(0.05)", on_output=lambda _: None)))
        runner.start()

        async def running() -> bool:
            _, jobs = await get_json(jp_fetch, "jobs")
            return any(job["state"] == "running" for job in jobs["jobs"])

        await _until(running)
        _, jobs = await get_json(jp_fetch, "jobs")
        [job] = [j for j in jobs["jobs"] if j["state"] == "running"]
        code, body = await get_json(jp_fetch, "jobs", str(job["id"]), "cancel", method="POST")
        assert code == 200, body
        await asyncio.to_thread(runner.join, 30)
        assert not runner.is_alive(), "cancel did not stop the running cell"
        assert result["r"].error is not None and "KeyboardInterrupt" in repr(result["r"].error)
        session.close()
    finally:
        holder.close()
        waiter.join(30)
