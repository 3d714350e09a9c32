"""Property-based fuzzing of a running server: HTTP requests and protocol frames.

Whatever arrives, the server answers with a 2xx/4xx (or closes a request it
cannot parse), never a 500, never a traceback or an exception's text, and
answers protocol garbage with an error or a close for cause (1002, 1008,
1009), never an internal error; and afterwards a normal client still works.
The examples are derandomized (the same on every run) and no example
database is written, so the run is repeatable; Hypothesis keeps its caches
in the temporary folder, so the tree stays clean.
"""

from __future__ import annotations

import json
import socket
import struct
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from websockets.exceptions import ConnectionClosed

from remote_gpu_kernel import Client
from remote_gpu_core.errors import ProtocolError
from remote_gpu_core.protocol import encode
from remote_gpu_core.protocol import messages as m
from raw_client import RawClient
from servers import ServerProcess

set_hypothesis_home_dir(f"{tempfile.gettempdir()}/remote-gpu-kernel-hypothesis")
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: What no answer may contain: a Python traceback or an exception's repr.
LEAKS = (b"Traceback", b'File "', b"Exception(", b"Error(")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    server = ServerProcess(tmp_path_factory.mktemp("fuzz"), "cpu:1", "--max-message", "256K")
    token = server.token("alice")
    server.start()
    yield server, token
    # After everything below: the server still serves a normal client, and logged no traceback.
    with Client(server.url, token).session() as session:
        assert session.execute("1 + 1", on_output=lambda _: None).ok
    assert server.proc is not None and server.proc.poll() is None
    assert not [line for line in server.log if "Traceback" in line]
    server.stop()


# -- HTTP -------------------------------------------------------------------

_URL_CHARS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyz0123456789/-_.~%?&=+;:@!*'()[],$#"))
_ROUTES = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(["/api/jobs/", "/api/jobs?", "/api/usage?since=", "/api/jobs?limit=", "/api/sessions/",
                     "/api/jobs/1/output?after=", "/api/jobs/1/output?limit=", "/api/jobs?state=",
                     "/api/jobs?kind=", "/metrics?", "/api/status?"]),
    st.one_of(st.text(_URL_CHARS, max_size=40), st.integers().map(str),
              st.integers(min_value=(1 << 63) - 8, max_value=10 ** 30).map(str),
              st.floats().map(repr), st.sampled_from(["nan", "inf", "-inf", "1e999", "9" * 400, "%00", "%ff"])),
)
_PATHS = st.one_of(_ROUTES, _ROUTES, st.text(_URL_CHARS, max_size=60).map(lambda t: "/" + t))
_HEADER_NAMES = st.sampled_from(["Authorization", "Origin", "Upgrade", "Connection", "Host",
                                 "Content-Length", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "X-Any"])
_HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)


@st.composite
def http_requests(draw: Any, token: str) -> bytes:
    """Any method, path, version and a few headers (some the server acts on, repeated or not)."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FOO"])
                  | st.text(st.sampled_from(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")), min_size=1, max_size=8))
    who = draw(st.sampled_from([token, token, "rgpu_bogus", ""]))
    headers = ["Host: x", f"Authorization: Bearer {who}"]
    headers += [f"{n}: {v}" for n, v in draw(st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4))]
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    return f"{method} {draw(_PATHS)} {version}\r\n{''.join(h + chr(13) + chr(10) for h in headers)}\r\n".encode()


def exchange(server: ServerProcess, data: bytes) -> bytes:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def check_answer(answer: bytes) -> None:
    if not answer:
        return  # not a request it could parse: closed without an answer
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 500, answer[:300]
    assert not any(leak in answer for leak in LEAKS), answer[:300]


def test_routes_with_fuzzed_parameters_never_get_a_500(target: tuple[ServerProcess, str]) -> None:
    server, token = target

    @FUZZ
    @given(path=_ROUTES, method=st.sampled_from(["GET", "GET", "GET", "POST"]))
    def check(path: str, method: str) -> None:
        check_answer(exchange(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
                                      f"Authorization: Bearer {token}\r\n\r\n".encode()))

    check()


def test_http_requests_never_get_a_500(target: tuple[ServerProcess, str]) -> None:
    server, token = target

    @FUZZ
    @given(data=http_requests(token) | st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"))
    def check(data: bytes) -> None:
        check_answer(exchange(server, data))

    check()


# -- protocol frames --------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_TYPES = [t.value for t in m.MessageType]
_FIELDS = ["req", "code", "names", "counts", "gpus", "resume", "priority", "pool", "notebook", "timeout",
           "silent", "after", "value", "msg_type", "content", "protocol", "client", "position", "session"]


def _frame(header: bytes, body: bytes = b"", *, magic: bytes = b"RG", version: int = 1,
           length: int | None = None) -> bytes:
    return struct.pack(">2sBBI", magic, version, 0, len(header) if length is None else length) + header + body


@st.composite
def bad_fields(draw: Any) -> bytes:
    """A well-framed header whose fields are anything."""
    fields = {"t": draw(st.sampled_from(_TYPES) | st.text(max_size=10))}
    fields.update(draw(st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=5)))
    return _frame(json.dumps(fields).encode())


@st.composite
def lying_lengths(draw: Any) -> bytes:
    """A valid header whose buffer lengths do not match the bytes that follow."""
    lengths = draw(st.lists(st.integers(0, 64), min_size=1, max_size=3))
    header = json.dumps({"t": "push", "req": 7, "names": ["a"], "counts": [len(lengths)], "b": lengths}).encode()
    return _frame(header, draw(st.binary(max_size=200)))


@st.composite
def prefix_then_garbage(draw: Any) -> bytes:
    whole = bytes(encode(draw(st.sampled_from([
        m.Execute(3, "1"), m.Pull(4, ["x"]), m.Replay(5, 0), m.LeaseRequest(6, gpus=1, pool="nope"),
        m.Push(8, ["a"], [1], (b"pickle",)), m.Interrupt(0)])))[0])
    cut = draw(st.integers(1, len(whole)))
    return whole[:cut] + draw(st.binary(max_size=64))


@st.composite
def odd_framing(draw: Any) -> bytes:
    header = draw(st.binary(max_size=40))
    return _frame(header, magic=draw(st.sampled_from([b"RG", b"GR", b"\0\0"])),
                  version=draw(st.integers(0, 255)),
                  length=draw(st.sampled_from([0, len(header), 1 << 31, (1 << 32) - 1])))


_FRAMES = st.lists(st.binary(min_size=1, max_size=64) | bad_fields() | lying_lengths() | prefix_then_garbage()
                   | odd_framing(), min_size=1, max_size=4)


def assert_fine(msg: m.Message) -> None:
    if isinstance(msg, m.Error):
        assert msg.code is not m.ErrorCode.INTERNAL, msg
        assert "Traceback" not in msg.message and "\n" not in msg.message, msg


def test_protocol_frames_never_break_the_server(target: tuple[ServerProcess, str]) -> None:
    server, token = target

    @FUZZ
    @given(frames=_FRAMES, hello_first=st.booleans(), text=st.booleans())
    def check(frames: list[bytes], hello_first: bool, text: bool) -> None:
        with RawClient(server.url, token) as raw:
            if hello_first:
                raw.hello()
            try:
                for frame in frames:
                    raw.send_raw(frame.decode("latin-1") if text else frame)
                raw.send(m.Release(999))  # answered while the stream is in step
                while True:
                    msg = raw.receive(timeout=0.5)
                    assert_fine(msg)
                    if getattr(msg, "req", None) == 999:
                        break
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code in (1002, 1008, 1009), closed
            except TimeoutError:
                pass  # lengths that lie: the probe went into a buffer the server still waits for
            except ProtocolError as exc:  # what the server sent could not be read
                raise AssertionError(f"the server sent something unreadable: {exc}") from None

    check()


def test_a_leased_session_survives_fuzzed_requests(target: tuple[ServerProcess, str]) -> None:
    server, token = target
    requests = st.one_of(
        st.builds(m.Replay, st.just(0), st.integers(-(1 << 63), (1 << 63) - 1)),
        st.builds(m.Pull, st.integers(0, 100), st.lists(st.text(max_size=12), max_size=3)),
        st.builds(m.Push, st.integers(0, 100), st.lists(st.text(max_size=5), max_size=2),
                  st.lists(st.integers(-2, 3), max_size=2), st.lists(st.binary(max_size=50), max_size=3).map(tuple)),
        st.builds(m.Execute, st.integers(0, 100), st.sampled_from(["1", "x = 2", "print('hi')", "1/0"]),
                  st.none() | st.floats(-5, 5)),
        st.builds(m.Input, st.just(0), st.text(max_size=10)),
        st.builds(m.Interrupt, st.just(0)),
        st.builds(m.LeaseRequest, st.integers(0, 100), st.integers(-3, 3), st.none() | st.text(max_size=8)),
    )
    with RawClient(server.url, token) as raw:
        raw.hello()
        session = raw.lease().session

        @FUZZ
        @given(batch=st.lists(requests, min_size=1, max_size=5))
        def check(batch: list[m.Message]) -> None:
            for msg in batch:
                raw.send(msg)
            raw.send(m.Replay(1000, 0))  # in turn behind them all
            while True:
                msg = raw.receive(timeout=60)
                assert_fine(msg)
                if isinstance(msg, (m.ReplayDone, m.Error)) and msg.req == 1000:
                    break

        check()
        raw.send(m.Execute(1001, "'alive'"))
        done = raw.answer(1001, m.ExecuteDone, timeout=60)
        assert isinstance(done, m.ExecuteDone) and done.status == "ok"
        assert raw.lease(1002, resume=session).session == session
        raw.send(m.Release(1003))
        assert isinstance(raw.answer(1003, m.Released), m.Released)
