"""Bad input to the HTTP API gets a 4xx with a one-line reason, never a 500,
never an exception's text, never a NaN in JSON."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from servers import ServerProcess


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    proc = ServerProcess(tmp_path_factory.mktemp("http-input"), "cpu:1")
    token = proc.token("alice")
    proc.start(wait_warm=False)
    yield proc, token
    proc.stop()


def request(server: ServerProcess, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` (a request line and headers, no blank line) as it is; the status and body."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        return 0, b""  # closed without an answer
    status_line, _, rest = data.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


def get(server: ServerProcess, token: str, target: str, method: str = "GET",
        extra: str = "") -> tuple[int, bytes]:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
    return request(server, (head + extra).encode())


def one_line_reason(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert isinstance(error, str) and "\n" not in error and len(error) < 300
    assert "Traceback" not in error and "Error:" not in error
    return error


@pytest.mark.parametrize(("target", "status", "reason"), [
    ("/api/jobs/99999999999999999999999", 404, "no job 99999999999999999999"),
    ("/api/jobs/" + "9" * 5000, 404, "of yours"),
    ("/api/jobs/0", 404, "no job 0"),
    ("/api/jobs/" + "9" * 5000 + "/output", 404, "of yours"),
    ("/api/jobs?limit=nan", 400, "limit must be a whole number from 1 to 1000"),
    ("/api/jobs?limit=1e999", 400, "limit must be a whole number"),
    ("/api/jobs?limit=99999999999999999999999", 400, "limit must be"),
    ("/api/jobs?limit=" + "1" * 5000, 400, "limit must be"),
    ("/api/jobs?limit=0", 400, "limit must be"),
    ("/api/jobs?state=bogus", 400, "unknown state"),
    ("/api/jobs?kind=bogus", 400, "unknown kind"),
    ("/api/jobs?user=%00", 400, "NUL"),
    ("/api/usage?since=nan", 400, "since must be a finite number"),
    ("/api/usage?since=inf", 400, "since must be a finite number"),
    ("/api/usage?since=-1e999", 400, "since must be a finite number"),
    ("/api/usage?since=" + "1" * 500, 400, "since must be a finite number"),
    ("/api/usage?since=%ff%fe", 400, "since must be"),
    ("/api/nowhere/%ff", 404, "no such endpoint"),
    ("/" + "a" * 3000, 404, "no such endpoint"),
    ("/api/sessions/zz/release", 404, "no such endpoint"),
])
def test_bad_input_is_a_4xx_with_one_line(http: tuple[ServerProcess, str], target: str, status: int,
                                          reason: str) -> None:
    server, token = http
    code, body = get(server, token, target)
    assert code == status, body
    assert reason in one_line_reason(body)


def test_good_numbers_still_work(http: tuple[ServerProcess, str]) -> None:
    server, token = http
    code, body = get(server, token, "/api/usage?since=1700000000.5")
    assert code == 200 and json.loads(body)["since"] == 1700000000.5
    code, body = get(server, token, "/api/jobs?limit=5&state=completed&kind=batch")
    assert code == 200 and json.loads(body) == {"jobs": [], "total": 0}


@pytest.mark.parametrize(("method", "target", "status"), [
    ("FOO", "/api/status", 405), ("DELETE", "/api/jobs", 405), ("HEAD", "/api/status", 405),
    ("POST", "/api/status", 405), ("GET", "/api/jobs/1/cancel", 405), ("PUT", "/metrics", 405),
    ("POST", "/api/jobs/" + "9" * 40 + "/cancel", 404),
])
def test_odd_methods_are_refused(http: tuple[ServerProcess, str], method: str, target: str,
                                 status: int) -> None:
    server, token = http
    code, body = get(server, token, target, method)
    assert code == status
    if method != "HEAD":
        one_line_reason(body)


@pytest.mark.parametrize("header", ["Authorization: Bearer x", "Upgrade: websocket", "Origin: http://a"])
def test_a_repeated_header_is_a_400_or_403_not_a_500(http: tuple[ServerProcess, str], header: str) -> None:
    server, token = http
    extra = f"\r\n{header}\r\n{header.replace('x', 'y').replace('http://a', 'http://b')}"
    code, body = get(server, token, "/api/status", extra=extra)
    assert code in (400, 403)
    assert "one " in one_line_reason(body)


def test_a_repeated_token_on_a_websocket_handshake_is_a_400(http: tuple[ServerProcess, str]) -> None:
    server, token = http
    head = (f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\nAuthorization: Bearer {token}")
    code, body = request(server, head.encode())
    assert code == 400 and "one Authorization header" in one_line_reason(body)


def test_huge_query_strings_and_odd_paths_get_an_answer_or_a_close(http: tuple[ServerProcess, str]) -> None:
    server, token = http
    code, body = get(server, token, "/api/jobs?" + "a=b&" * 5000)
    assert code == 414 and b"Traceback" not in body  # the websockets library's own limit
    code, body = get(server, token, "/api/jobs?" + "a=b&" * 1500)
    assert code == 200
    code, _ = request(server, b"GET /api/\xff\xfe HTTP/1.1\r\nHost: x")
    assert code in (0, 400)  # not ASCII: the library closes without an answer
    code, body = get(server, token, "*")
    assert code == 404
    assert server.proc is not None and server.proc.poll() is None
    assert not any("Traceback" in line for line in server.log)
