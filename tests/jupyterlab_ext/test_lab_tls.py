"""The sidebar's server extension over TLS, through a real Jupyter server.

The relay reaches ``rgpu serve --tls self-signed`` over https:// when
``RGPU_CA`` names its certificate, and answers a problem with its own
message and hint when the certificate is not trusted or when the URL would
send the token in clear.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPResponse

from remote_gpu_kernel import Client
from servers import ServerProcess
from test_lab_handlers import get_json
from tls_certs import self_signed_cert

Fetch = Callable[..., Awaitable[HTTPResponse]]


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"remote_gpu_lab": True}}}


@pytest.fixture
def tls_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tls_server: ServerProcess,
            tls_alice: str) -> pytest.MonkeyPatch:
    """The TLS server and its token in the environment; no CA yet, no config file."""
    for name in ("RGPU_CA", "RGPU_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "rgpu-client.json"))
    monkeypatch.setenv("RGPU_URL", tls_server.url)
    monkeypatch.setenv("RGPU_TOKEN", tls_alice)
    return monkeypatch


async def test_the_relay_over_https_with_the_servers_certificate(jp_fetch: Fetch, tls_env: pytest.MonkeyPatch,
                                                                 tls_server: ServerProcess,
                                                                 tls_alice: str) -> None:
    tls_env.setenv("RGPU_CA", str(self_signed_cert(tls_server)))
    code, body = await get_json(jp_fetch, "status")
    assert code == 200, body
    assert body["url"] == tls_server.url and body["status"]["you"]["user"] == "alice"
    assert tls_alice not in json.dumps(body)
    # A state-changing request goes through too (the relay sends no Origin).
    with Client(tls_server.url, tls_alice, cafile=str(self_signed_cert(tls_server))).session() as session:
        code, body = await get_json(jp_fetch, "sessions", session.id, "release", method="POST")
        assert code == 200 and body["released"] is True, body


async def test_an_untrusted_certificate_is_a_problem_with_a_hint(jp_fetch: Fetch,
                                                                 tls_env: pytest.MonkeyPatch) -> None:
    code, body = await get_json(jp_fetch, "status")
    assert (code, body["reason"]) == (502, "unreachable"), body
    assert "not trusted" in body["message"] and "self-signed certificate" in body["message"]
    assert "RGPU_CA" in body["hint"]


async def test_plain_http_to_another_host_is_refused_unless_insecure(jp_fetch: Fetch,
                                                                     tls_env: pytest.MonkeyPatch) -> None:
    tls_env.setenv("RGPU_URL", "ws://gpu-box.invalid:8765")
    code, body = await get_json(jp_fetch, "status")
    assert (code, body["reason"]) == (500, "bad-url"), body
    assert "refusing to send the token over plain http:// to gpu-box.invalid" in body["message"]
    assert "RGPU_INSECURE=1" in body["hint"]
    tls_env.setenv("RGPU_INSECURE", "1")
    code, body = await get_json(jp_fetch, "status")
    assert (code, body["reason"]) == (502, "unreachable"), body
