"""The server's operations on a worker on its host (a push, a pull, a holding
ask) ride the data channel: no Jupyter request, and nothing a cell sends
on that channel changes another operation's answer or the server."""

from __future__ import annotations

import numpy as np

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
#: answers that are not answers, answers to operations nobody asked, a flood
#: of them, and made-up successes for the next 200 operations, before they are asked.
FORGE_ANSWERS = """\
import gc, json, zmq
pairs = [o for o in gc.get_objects() if isinstance(o, zmq.Socket) and not o.closed
         and o.socket_type == zmq.PAIR and o.getsockopt(zmq.LAST_ENDPOINT).startswith(b"ipc://")]
for pair in pairs:
    for frames in ([b"R", b"{not json"], [b"R", b"[1]"], [b"R", b'{"id": "1"}'], [b"K", b"\\x00"], [b"K"]):
        pair.send_multipart(frames)
    for i in range(2000):
        pair.send_multipart([b"R", json.dumps({"id": 10**6 + i, "ok": True, "pad": "x" * 10000}).encode()])
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
