"""The Origin check: browser pages are refused unless allowed; scripts are never affected."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from remote_gpu_kernel import Client
from remote_gpu_server.frontdoor.origins import OriginPolicy, normalize_origin
from servers import ServerProcess

DASH = "https://dash.example.com"


@pytest.fixture(scope="module")
def allowing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server that allows pages from DASH."""
    proc = ServerProcess(tmp_path_factory.mktemp("origins"), "cpu:1", "--allow-origin", DASH)
    token = proc.token("alice")
    proc.start(wait_warm=False)
    yield proc, token
    proc.stop()


def _handshake(url: str, token: str, origin: str | None) -> int:
    """The handshake's HTTP status: 101 when the websocket opened."""
    try:
        with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                     origin=origin, open_timeout=10):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def _post(url: str, path: str, token: str, origin: str | None) -> tuple[int, dict[str, str]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"}
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request("POST", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_origins_compare_in_canonical_form() -> None:
    assert normalize_origin("HTTPS://Dash.Example.com:443") == "https://dash.example.com"
    assert normalize_origin("http://[::1]:8888/") == "http://[::1]:8888"
    for bad in ("null", "dash.example.com", "https://dash.example.com/page", "https://u@x.com",
                "https://x.com:99999", ""):
        assert normalize_origin(bad) is None, bad
    policy = OriginPolicy([DASH, "http://localhost:8888"])
    assert policy.refusal([]) is None
    assert policy.refusal(["https://DASH.example.com"]) is None
    assert policy.refusal(["http://localhost:8888"]) is None
    for refused in (["https://evil.example"], ["null"], ["http://dash.example.com"], [DASH, DASH]):
        assert policy.refusal(refused) is not None, refused
    assert "--allow-origin https://evil.example" in (OriginPolicy().refusal(["https://evil.example"]) or "")
    assert OriginPolicy(["*"]).refusal(["https://evil.example"]) is None
    with pytest.raises(ValueError, match="expected scheme://host"):
        OriginPolicy(["dash.example.com"])


def test_a_foreign_origin_is_refused_at_the_handshake(server: ServerProcess, alice: str) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(server.url, additional_headers={"Authorization": f"Bearer {alice}"},
                origin="https://evil.example", open_timeout=10)  # type: ignore[arg-type]
    response = info.value.response
    assert response.status_code == 403
    body = response.body.decode()
    assert body.count("\n") == 1 and "origin https://evil.example may not use" in body
    assert "--allow-origin" in body
    # Before the token: a page cannot learn whether a token is good.
    assert _handshake(server.url, "rgpu_wrong", "https://evil.example") == 403
    # No Origin (scripts, the kernel): unaffected.
    assert _handshake(server.url, alice, None) == 101
    with Client(server.url, alice).session() as session:
        assert session.execute("1 + 1").ok


def test_an_allowed_origin_passes_and_others_do_not(allowing: tuple[ServerProcess, str]) -> None:
    server, token = allowing
    assert _handshake(server.url, token, DASH) == 101
    assert _handshake(server.url, token, "https://DASH.example.com:443") == 101
    assert _handshake(server.url, token, "https://evil.example") == 403
    assert _handshake(server.url, token, "http://dash.example.com") == 403  # another scheme


def test_http_requests_with_a_foreign_origin_are_refused(allowing: tuple[ServerProcess, str]) -> None:
    server, token = allowing
    path = "/api/sessions/0123abcd/release"
    status, body = _post(server.url, path, token, "https://evil.example")
    assert status == 403 and "origin https://evil.example may not use" in body["error"]
    # Without an Origin, or from an allowed one, the request is answered as usual.
    for origin in (None, DASH):
        status, body = _post(server.url, path, token, origin)
        assert status == 404 and "no session" in body["error"], (origin, body)
    assert "origin https://evil.example" in server.wait_for_log(r"refused a request from")


def test_serve_refuses_a_malformed_allow_origin(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0",
                          "--db", str(tmp_path / "db.sqlite3"), "--slots", "cpu:1",
                          "--allow-origin", "dash.example.com"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("rgpu serve: --allow-origin 'dash.example.com'")
