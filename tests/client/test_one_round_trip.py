"""A ``%%gpu -i a -o b`` cell is one round trip: its requests all go out before any answer.

Against a real server (``--max-push 1M``) behind a :class:`~message_gate.MessageGate`,
which counts the websocket messages each way and, when asked, holds the
server's answers until the client has sent the cell's requests: a client
that waited for an answer between them would never finish. The server
runs a cell only if the push of its inputs succeeded and pulls only if the
cell did; every bad path says what it said when push, cell and pull were
three round trips (the same words as the ``%gpu push`` and ``%gpu pull``
line magics, which still are).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from message_gate import MessageGate
from raw_client import RawClient
from remote_gpu_core.protocol import dump_values, encode, load_values
from remote_gpu_core.protocol import messages as m
from remote_gpu_kernel.sync import Client
from servers import ServerProcess

from kernels import CellRun, LocalKernel

#: How long a cell may take here, on a loaded machine, before a client that
#: waits for an answer the gate holds is taken to be stuck.
STUCK = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("onetrip"), "cpu:2", "--max-push", "1M").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gate(server: ServerProcess) -> Iterator[MessageGate]:
    proxy = MessageGate.for_url(server.url)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def kernel(server: ServerProcess, gate: MessageGate) -> Iterator[LocalKernel]:
    k = LocalKernel(dict(os.environ, RGPU_URL=gate.url, RGPU_TOKEN=server.token("alice")))
    try:
        k.run("%load_ext remote_gpu_kernel")
        assert k.run("%%gpu\nprint('leased')").stdout == "leased\n"
        yield k
    finally:
        k.close()


def gated_cell(gate: MessageGate, kernel: LocalKernel, code: str, requests: int) -> tuple[CellRun, int, int]:
    """Run ``code`` with the server's answers held until the kernel has sent
    ``requests`` messages; the cell, and the messages it sent and got."""
    sent, answered = gate.counts()
    gate.hold_answers(requests)
    try:
        run = kernel.run(code, timeout=STUCK)
    except TimeoutError:
        pytest.fail(f"the kernel sent {gate.counts()[0] - sent} of the cell's {requests} requests, "
                    "then waited for an answer")
    finally:
        gate.open()
    now_sent, now_answered = gate.counts()
    return run, now_sent - sent, now_answered - answered


def test_a_magic_cell_with_inputs_and_outputs_sends_its_three_requests_before_any_answer(
        gate: MessageGate, kernel: LocalKernel) -> None:
    kernel.run("a = 41")
    run, sent, answered = gated_cell(gate, kernel, "%%gpu -i a -o b\nb = a + 1", requests=3)
    assert run.reply["status"] == "ok", run.reply
    # Push, cell, pull; their answers: PushDone, ExecuteDone and the PullReply,
    # whose one buffer streams from the worker after its header. Nothing else.
    assert (sent, answered) == (3, 4)
    assert kernel.run("print(b)").stdout == "42\n"
    # A cell without variables is one request, one answer (and what it prints).
    run, sent, answered = gated_cell(gate, kernel, "%%gpu\nprint(a)", requests=1)
    assert run.stdout == "41\n" and (sent, answered) == (1, 2)


def test_the_api_runs_a_cell_with_its_variables_in_one_round_trip(server: ServerProcess,
                                                                  gate: MessageGate) -> None:
    import numpy as np

    client = Client(gate.url, server.token("bob"))
    with client.session() as session, concurrent.futures.ThreadPoolExecutor(1) as pool:
        sent, _ = gate.counts()
        gate.hold_answers(3)
        try:
            result = pool.submit(session.run, "b = a * 2\nprint(b.sum())", push={"a": np.arange(4.0)},
                                 pull=["b"]).result(STUCK)
        except TimeoutError:
            pytest.fail(f"the client sent {gate.counts()[0] - sent} of 3 requests, then waited for an answer")
        finally:
            gate.open()
        assert gate.counts()[0] - sent == 3
        assert result.ok and result.stdout == "12.0\n"
        assert result.values["b"].tolist() == [0.0, 2.0, 4.0, 6.0]
        failed = session.run("c = a\n1 / 0", push={"a": 1}, pull=["c"])
        assert failed.error is not None and failed.error.ename == "ZeroDivisionError"
        assert failed.values == {}
        # The push ran, the cell ran up to its error; the blocking push, execute and pull are as they were.
        assert session.pull("a", "c") == {"a": 1, "c": 1}


def test_the_hello_and_the_lease_request_ride_the_websocket_upgrade(server: ServerProcess,
                                                                    gate: MessageGate) -> None:
    client = Client(gate.url, server.token("dave"))
    sent, answered = gate.counts()
    with client.session() as session:
        # Not one websocket message from the client: both were in its upgrade
        # request, and the welcome and the lease came right behind the 101.
        assert gate.counts() == (sent, answered + 2)
        assert client.user == "dave" and session.slots
        assert session.run("print(1 + 1)").stdout == "2\n"
    # A notebook path too long for a header: they go as the first two messages instead.
    sent, _ = gate.counts()
    with client.session(notebook="n" * 5000 + ".ipynb") as session:
        assert gate.counts()[0] - sent == 2 and session.slots


def test_the_server_reads_the_first_messages_from_the_upgrade_request_or_refuses_them(
        server: ServerProcess) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from remote_gpu_core.protocol import PROTOCOL_VERSION, Reader, upgrade

    token = server.token("erin")
    riding = upgrade.first_messages([m.Hello(PROTOCOL_VERSION, "raw-test"), m.LeaseRequest(1)])
    assert riding is not None
    with connect(server.url, additional_headers={"Authorization": f"Bearer {token}",
                                                 upgrade.FIRST_MESSAGES: riding},
                 compression=None, open_timeout=30) as ws:
        assert ws.response is not None and ws.response.headers[upgrade.FIRST_MESSAGES] == upgrade.READ
        reader, answers = Reader(), []
        while not any(isinstance(a, m.LeaseGranted) for a in answers):
            reader.receive_data(ws.recv(timeout=STUCK))
            answers.extend(reader.events_received())
        assert isinstance(answers[0], m.Welcome) and answers[0].user == "erin"
        ws.send(encode(m.Release(2))[0])
        while not any(isinstance(a, m.Released) for a in answers):
            reader.receive_data(ws.recv(timeout=STUCK))
            answers.extend(reader.events_received())
    with pytest.raises(InvalidStatus) as refused:
        with connect(server.url, additional_headers={"Authorization": f"Bearer {token}",
                                                     upgrade.FIRST_MESSAGES: "not base64!"},
                     open_timeout=30):
            pass
    assert refused.value.response.status_code == 400
    assert b"not base64" in refused.value.response.body


def test_a_push_the_worker_cannot_load_stops_the_cell_and_says_why(gate: MessageGate,
                                                                    kernel: LocalKernel) -> None:
    kernel.run("import os\nclass Here:\n    def __reduce__(self):\n"
               "        return (os.stat, ('/nonexistent/only-here',))\nbad = Here()\nb = 'local'")
    run = kernel.run("%%gpu -i bad -o b\nran = True\nb = 'remote'")
    assert run.reply["ename"] == "FileNotFoundError" and "only-here" in run.reply["evalue"], run.reply
    assert kernel.run("%gpu push bad").reply["evalue"] == run.reply["evalue"]  # as the push always said
    assert kernel.run("%%gpu\nprint('ran' in globals())").stdout == "False\n"
    assert kernel.run("print(b)").stdout == "local\n"


def test_a_cell_that_raises_returns_no_outputs(kernel: LocalKernel) -> None:
    kernel.run("a = 1\nb = 'local'")
    run = kernel.run("%%gpu -i a -o b\nprint('before', flush=True)\nb = 'remote'\n1 / 0")
    assert run.reply["ename"] == "ZeroDivisionError" and run.stdout == "before\n"
    assert kernel.run("print(b)").stdout == "local\n"
    assert kernel.run("%%gpu\nprint(b)").stdout == "remote\n"  # the remote namespace kept it


def test_an_output_the_cell_did_not_make_is_a_clear_name_error(kernel: LocalKernel) -> None:
    kernel.run("a = 7")
    run = kernel.run("%%gpu -i a -o never_made\nprint('ran', a)")
    assert run.stdout == "ran 7\n"
    assert run.reply["ename"] == "NameError" and "never_made" in run.reply["evalue"], run.reply
    assert kernel.run("%gpu pull never_made").reply["evalue"] == run.reply["evalue"]


def test_an_unpicklable_or_oversized_input_sends_nothing(gate: MessageGate, kernel: LocalKernel) -> None:
    kernel.run("import numpy as np\ngen = (i for i in range(3))\nbig = np.zeros(1 << 18)\nb = 'local'")
    before = gate.counts()
    unpicklable = kernel.run("%%gpu -i gen -o b\nran = True")
    too_big = kernel.run("%%gpu -i big -o b\nran = True")
    assert gate.counts()[0] == before[0], "nothing is sent for a cell whose inputs cannot go"
    assert unpicklable.reply["ename"] == "SerializationError" and "'gen'" in unpicklable.reply["evalue"]
    assert too_big.reply["ename"] == "MessageTooLarge" and "--max-push" in too_big.reply["evalue"]
    assert kernel.run("%gpu push big").reply["evalue"] == too_big.reply["evalue"]
    assert kernel.run("%%gpu\nprint('ran' in globals())").stdout == "False\n"


def _final_answers(client: RawClient, reqs: list[int]) -> dict[int, m.Message]:
    """The final answer (not an Output or Notice) of each of ``reqs``, in the order they came."""
    answers: dict[int, m.Message] = {}
    while len(answers) < len(reqs):
        msg = client.receive(timeout=STUCK)
        req = getattr(msg, "req", 0)
        if req in reqs and not isinstance(msg, (m.Output, m.Notice)):
            answers[req] = msg
    return answers


def test_the_server_runs_a_request_only_if_the_one_it_follows_succeeded(server: ServerProcess) -> None:
    with RawClient(server.url, server.token("carol")) as client:
        client.hello()
        client.lease(1)
        # A push the worker cannot load: the cell and the pull behind it do not run.
        client.send(m.Push(2, ["x"], [1], (b"not a pickle",)))
        client.send(m.Execute(3, "ran = True", after=2))
        client.send(m.Pull(4, ["ran"], after=3))
        answers = _final_answers(client, [2, 3, 4])
        assert list(answers) == [2, 3, 4]
        assert isinstance(answers[2], m.Error) and answers[2].code is m.ErrorCode.SERIALIZATION
        for req, follows in ((3, 2), (4, 3)):
            error = answers[req]
            assert isinstance(error, m.Error) and error.code is m.ErrorCode.NOT_RUN
            assert error.message == f"not run: request {follows}, which it follows, failed"
        # All good: each in turn, back to back.
        names, counts, buffers = dump_values({"x": 20})
        client.send(m.Push(5, names, counts, tuple(buffers)))
        client.send(m.Execute(6, "y = x + 1\nran = 'ran' in globals()", after=5))
        client.send(m.Pull(7, ["y", "ran"], after=6))
        answers = _final_answers(client, [5, 6, 7])
        assert isinstance(answers[5], m.PushDone)
        assert isinstance(answers[6], m.ExecuteDone) and answers[6].status == "ok"
        pulled = answers[7]
        assert isinstance(pulled, m.PullReply)
        assert load_values(pulled.names, pulled.counts, pulled.buffers) == {"y": 21, "ran": False}
        # A cell that raises: no pull. A request that follows one never sent: refused.
        client.send(m.Execute(8, "1 / 0"))
        client.send(m.Pull(9, ["y"], after=8))
        client.send(m.Execute(10, "z = 1", after=99))
        answers = _final_answers(client, [8, 9, 10])
        assert isinstance(answers[8], m.ExecuteDone) and answers[8].status == "error"
        assert isinstance(answers[9], m.Error) and answers[9].code is m.ErrorCode.NOT_RUN
        assert isinstance(answers[10], m.Error) and "not an earlier request" in answers[10].message
        client.send(m.Release(11))
        assert isinstance(client.answer(11, m.Released), m.Released)


#: A value whose loading in the worker waits until a port on this host listens.
_SLOW_TO_LOAD = """
def wait_for_listener(port):
    import socket, time
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return "loaded"
        except OSError:
            time.sleep(0.05)

class SlowToLoad:
    def __init__(self, port):
        self.port = port

    def __reduce__(self):
        return (wait_for_listener, (self.port,))
"""


def test_an_interrupt_while_the_inputs_load_stops_the_cell_before_it_begins(server: ServerProcess) -> None:
    import socket

    namespace: dict[str, object] = {"__name__": "__main__"}  # pickled by value, as a notebook's
    exec(_SLOW_TO_LOAD, namespace)
    with socket.socket() as listener, RawClient(server.url, server.token("gina")) as client:
        listener.bind(("127.0.0.1", 0))  # not listening yet: the push's loading waits
        slow = namespace["SlowToLoad"](listener.getsockname()[1])  # type: ignore[operator]
        names, counts, buffers = dump_values({"x": slow})
        client.hello()
        client.lease(1)
        client.send(m.Push(2, names, counts, tuple(buffers)))
        client.send(m.Execute(3, "ran = True", after=2))
        client.send(m.Pull(4, ["ran"], after=3))
        client.send(m.Interrupt(0))
        client.send(m.LeaseRequest(5))  # answered at once, after the interrupt was taken
        assert isinstance(client.answer(5, m.LeaseGranted), m.LeaseGranted)
        listener.listen()
        answers = _final_answers(client, [2, 3, 4])
        assert isinstance(answers[2], m.PushDone)
        for req, follows in ((3, 2), (4, 3)):
            error = answers[req]
            assert isinstance(error, m.Error) and error.code is m.ErrorCode.NOT_RUN
            assert error.message == f"not run: request {follows}, which it follows, was interrupted"
        client.send(m.Pull(6, ["x", "ran"]))
        reply = client.answer(6, m.PullReply)
        assert isinstance(reply, m.Error) and reply.code is m.ErrorCode.NAME_ERROR and "ran" in reply.message
        client.send(m.Release(7))
        assert isinstance(client.answer(7, m.Released), m.Released)


def test_a_remote_gpu_kernel_cell_is_one_request_and_its_answers(
        server: ServerProcess, gate: MessageGate, tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing else crosses for a cell: no lease check, no history write, no comm traffic."""
    from remote_kernels import KernelDriver, install_kernelspec, kernel_env

    prefix = tmp_path_factory.mktemp("prefix")
    monkeypatch.setenv("JUPYTER_PATH", str(install_kernelspec(prefix)))
    env = kernel_env(prefix, gate.url, server.token("frank"))
    driver = KernelDriver(env).start()
    try:
        assert driver.run("x = 20").status == "ok"  # the lease
        for code, answers in (("x += 1", 1), ("print(x)", 2), ("x", 2)):
            sent, answered = gate.counts()
            gate.hold_answers(1)
            try:
                run = driver.run(code, timeout=STUCK)
            finally:
                gate.open()
            assert run.status == "ok"
            assert gate.counts() == (sent + 1, answered + answers), code  # the cell; its outputs and reply
    finally:
        driver.shutdown()
