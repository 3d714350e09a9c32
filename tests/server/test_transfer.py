"""The worker data channel's filler, and a push cut short by a disconnect."""

from __future__ import annotations

import pytest
from websockets.sync.client import connect

from remote_gpu_kernel import Client
from remote_gpu_kernel.errors import ProtocolError
from remote_gpu_kernel.protocol import PROTOCOL_VERSION, Reader, encode
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_server.transfer import Filler, pieces
from servers import ServerProcess


def test_filler_reassembles_pieces_across_buffers() -> None:
    data = [b"a" * 5, b"", b"b" * 7]
    filler = Filler([len(d) for d in data])
    for piece in [b"aaa", b"aab", b"bbbbbb"]:
        filler.add(piece)
    assert filler.done and [bytes(b) for b in filler.buffers] == data
    with pytest.raises(ProtocolError, match="more bytes"):
        filler.add(b"x")
    assert [bytes(p) for p in pieces([b"abcdefg"], 3)] == [b"abc", b"def", b"g"]


def test_push_cut_short_leaves_the_session_usable(fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--grace", "30"]
    fresh_server.start()
    token = fresh_server.token()
    with connect(fresh_server.url, additional_headers={"Authorization": f"Bearer {token}"},
                 compression=None, max_size=None) as ws:
        reader = Reader()

        def receive() -> m.Message:
            while True:
                reader.receive_data(ws.recv(timeout=30))
                events = reader.events_received()
                if events:
                    return events[0]

        ws.send(encode(m.Hello(PROTOCOL_VERSION))[0])
        receive()
        ws.send(encode(m.LeaseRequest(1))[0])
        granted = receive()
        assert isinstance(granted, m.LeaseGranted)
        frames = encode(m.Push(2, ["half"], [2], (b"pickle", b"x" * 5_000_000)))
        for frame in frames[:3]:
            ws.send(frame)
    session = Client(fresh_server.url, token).session(resume=granted.session)
    assert session.resumed
    from remote_gpu_kernel import RemoteError

    with pytest.raises(RemoteError, match="not defined"):
        session.pull("half")
    session.push(whole=list(range(5)))
    assert session.pull("whole") == {"whole": [0, 1, 2, 3, 4]}
    session.release()
