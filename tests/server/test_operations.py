"""The server's operations on a worker on its host (a push, a pull, a holding
ask) ride the data channel: no Jupyter request, and nothing a cell sends
on that channel changes another operation's answer or the server."""

from __future__ import annotations

import numpy as np
import pytest

from remote_gpu_core.errors import RemoteGpuError
from remote_gpu_kernel import Client
from servers import ServerProcess

#: A cell that counts the Jupyter comm requests its kernel handles from now on (in ``comm_requests``).
COUNT_COMM_REQUESTS = """\
comm_requests = []
_kernel = get_ipython().kernel
_handle_comm = _kernel.shell_handlers["comm_msg"]
def _counting(*args, **kwargs):
    comm_requests.append(1)
    return _handle_comm(*args, **kwargs)
_kernel.shell_handlers["comm_msg"] = _counting
"""

#: A hostile cell: it sends the server, on its own worker's data channel,
#: answers that are not answers, answers to operations nobody asked, and
#: made-up successes for ids 1 to 199 (what a count would give the next operations), before they are asked.
#: (What fits in the stream while the server reads nothing; a flood is below.)
FORGE_ANSWERS = """\
import gc, json
from remote_gpu_server.worker_process.streams import BlockingStream
pairs = [o for o in gc.get_objects() if isinstance(o, BlockingStream)]
for pair in pairs:
    for frames in ([b"R", b"{not json"], [b"R", b"[1]"], [b"R", b'{"id": "1"}'], [b"K", b"\\x00"], [b"K"]):
        pair.send_multipart(frames)
    for i in range(20):
        pair.send_multipart([b"R", json.dumps({"id": 10**6 + i, "ok": True, "pad": "x" * 1000}).encode()])
    for i in range(1, 200):
        pair.send_multipart([b"R", json.dumps({"id": i, "ok": True, "names": [], "sizes": [1 << 40]}).encode()])
len(pairs)
"""


def _value(result: object) -> str:
    outputs = getattr(result, "outputs")
    return str(outputs[-1].content["data"]["text/plain"])


def test_a_push_a_pull_and_a_holding_ask_are_no_jupyter_requests_to_the_worker(
        server: ServerProcess, alice: str) -> None:
    a = np.arange(1000, dtype=np.float32)
    with Client(server.url, alice).session() as s:
        assert s.execute(COUNT_COMM_REQUESTS, on_output=lambda _: None).ok
        s.push(a=a, small=[1, 2])
        s.push(a=a)  # the same buffer again: the client asks what the worker holds
        back = s.run("b = a * 2", lambda _: None, push={"c": 3}, pull=["b", "small", "c"]).values
        assert _value(s.execute("len(comm_requests)", on_output=lambda _: None)) == "0"
    assert np.array_equal(back["b"], a * 2) and back["small"] == [1, 2] and back["c"] == 3


def test_answers_a_cell_makes_up_on_the_data_channel_change_nothing(server: ServerProcess, alice: str) -> None:
    bob = server.token("bob")
    a = np.arange(1 << 20, dtype=np.float32)
    logged = len(server.log)
    with Client(server.url, alice).session() as s, Client(server.url, bob).session() as other:
        other.push(kept=[1, 2, 3])
        assert _value(s.execute(FORGE_ANSWERS, on_output=lambda _: None)) == "1"
        s.push(a=a)
        assert _value(s.execute("float(a.sum())", on_output=lambda _: None)) == str(float(a.sum()))
        assert np.array_equal(s.pull("a")["a"], a)
        assert other.pull("kept") == {"kept": [1, 2, 3]}
    assert not any("Traceback" in line for line in server.log[logged:])


#: A hostile cell: a thread of it writes 1 GiB of notes of 4 MiB on its own
#: worker's data channel, while the server asks it nothing, until the stream
#: takes nothing more for 3 s; ``flood`` holds the bytes it got out.
FLOOD = """\
import gc, select, socket, struct, threading
from remote_gpu_server.worker_process.streams import BlockingStream, note_bytes
sock = [o for o in gc.get_objects() if isinstance(o, BlockingStream)][0]._conn._sock
note = b"".join(bytes(p) for p in note_bytes([b"R", b"x" * ((4 << 20) - 100)]))
flood = {"sent": 0, "blocked": False}
def _flood():
    for _ in range(256):
        view = memoryview(note)
        while view:
            try:
                n = sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not select.select([], [sock], [], 3)[1]:
                    flood["blocked"] = True
                    return
                continue
            flood["sent"] += n
            view = view[n:]
_flooding = threading.Thread(target=_flood)
_flooding.start()
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) << 10


def test_a_cell_that_floods_its_data_channel_fills_its_own_memory_not_the_servers(
        server: ServerProcess, alice: str) -> None:
    assert server.proc is not None
    bob = server.token("bob")
    logged = len(server.log)
    with Client(server.url, bob).session() as other:
        other.push(kept=[1, 2, 3])
        before = _rss(server.proc.pid)
        with Client(server.url, alice).session() as s:
            assert s.execute(FLOOD, on_output=lambda _: None).ok
            assert s.execute("_flooding.join()", on_output=lambda _: None).ok
            sent = int(_value(s.execute("flood['sent']", on_output=lambda _: None)))
            assert _value(s.execute("flood['blocked']", on_output=lambda _: None)) == "True"
            grown = _rss(server.proc.pid) - before
            # At most 8 notes read ahead and one being read, of 4 MiB each, of the 1 GiB.
            print(f"the flood got {sent >> 20} MiB out, the server grew {grown >> 20} MiB")
            assert sent < 64 << 20 and grown < 64 << 20, (sent, grown)
            assert other.pull("kept") == {"kept": [1, 2, 3]}
        assert other.pull("kept") == {"kept": [1, 2, 3]}
    assert not any("Traceback" in line for line in server.log[logged:])


def test_a_note_larger_than_a_note_may_be_ends_that_workers_channel_only(server: ServerProcess, alice: str) -> None:
    bob = server.token("bob")
    with Client(server.url, alice).session() as s, Client(server.url, bob).session() as other:
        other.push(kept=[1, 2, 3])
        assert s.execute(
            "import gc, struct\n"
            "from remote_gpu_server.worker_process.streams import BlockingStream\n"
            "[o for o in gc.get_objects() if isinstance(o, BlockingStream)][0]._conn._sock.sendall("
            "b'\\x01' + struct.pack('>I', 1 << 30))", on_output=lambda _: None).ok
        with pytest.raises(RemoteGpuError, match="push cut short: .* more than 4259840 bytes.*restart the kernel"):
            s.push(a=[1])
        assert _value(s.execute("1 + 1", on_output=lambda _: None)) == "2"  # its cells go on
        assert other.pull("kept") == {"kept": [1, 2, 3]}
