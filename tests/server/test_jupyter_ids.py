"""Jupyter ids and whole messages through the real server, with the asyncio client.

A request runs on the worker under the msg_id its client gave (the
frontend's), one already in flight is refused, output published after its
request ended comes back naming its request, and a comm message for a comm
the worker does not have gets a reason instead of silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from remote_gpu_kernel import AsyncClient, AsyncSession, ServerError
from remote_gpu_core.protocol import messages as m
from servers import ServerProcess


def _run(server: ServerProcess, token: str, body: Callable[[AsyncSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with AsyncClient(server.url, token).session() as session:
            await body(session)

    asyncio.run(main())


def test_outputs_and_an_output_widget_carry_the_frontends_id(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        outputs: list[m.Output] = []
        await session.execute("import ipywidgets as w\nout = w.Output()\nwith out:\n    print('in')\n"
                              "s = w.IntSlider()", outputs.append, parent={"msg_id": "nb-cell-1"})
        assert {o.parent for o in outputs} == {"nb-cell-1"}
        opens = [o for o in outputs if o.msg_type == "comm_open"]
        assert opens and all(o.metadata == {"version": "2.1.0"} for o in opens)
        captured = [o.content["data"]["state"]["msg_id"] for o in outputs
                    if o.msg_type == "comm_msg" and "msg_id" in o.content["data"].get("state", {})]
        assert captured == ["nb-cell-1", ""], "the Output widget records the frontend's own id"

    _run(server, alice, body)


def test_a_msg_id_already_in_flight_is_refused(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        running = asyncio.Event()
        cell = asyncio.ensure_future(session.execute("import time; print('running', flush=True); time.sleep(1.5)",
                                                     lambda _: running.set(), parent={"msg_id": "same"}))
        await asyncio.wait_for(running.wait(), 30)
        with pytest.raises(ServerError, match="already running"):
            await session.shell_request("kernel_info_request", {}, parent={"msg_id": "same"})
        assert (await cell).ok
        with pytest.raises(ServerError, match="1 to 200 characters"):
            await session.shell_request("kernel_info_request", {}, parent={"msg_id": "x" * 201})
        reply = await session.shell_request("kernel_info_request", {}, parent={"msg_id": "same"})
        assert reply.content["status"] == "ok", "the id is free again once its request ended"

    _run(server, alice, body)


def test_output_after_its_request_ended_comes_back_naming_it(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        late: asyncio.Queue[m.Output] = asyncio.Queue()
        session.on_background = late.put_nowait
        await session.execute("import threading\nthreading.Timer(0.3, lambda: print('late', flush=True)).start()",
                              lambda _: None, parent={"msg_id": "nb-cell-2"})
        msg = await asyncio.wait_for(late.get(), 30)
        assert (msg.req, msg.msg_type, msg.content["text"], msg.parent) == (0, "stream", "late\n", "nb-cell-2")

    _run(server, alice, body)


def test_what_a_task_prints_right_after_its_cell_is_not_the_cells_output(server: ServerProcess,
                                                                        alice: str) -> None:
    """ipykernel runs a task a cell started once the cell's idle is out: a
    frontend does not count it as the cell's, so neither does the server."""
    async def body(session: AsyncSession) -> None:
        late: asyncio.Queue[m.Output] = asyncio.Queue()
        session.on_background = late.put_nowait
        for n in range(10):  # it raced with the end of the request: ten tries
            result = await session.execute(
                f"import asyncio\nasync def later():\n    print('after {n}', flush=True)\n"
                f"asyncio.ensure_future(later())", lambda _: None, parent={"msg_id": f"nb-task-{n}"})
            assert result.stdout == "", f"try {n}: the task's print came as the cell's output"
            msg = await asyncio.wait_for(late.get(), 30)
            assert (msg.req, msg.content["text"], msg.parent) == (0, f"after {n}\n", f"nb-task-{n}")

    _run(server, alice, body)


@pytest.mark.parametrize("msg_type, content, reason", [
    ("comm_msg", {"comm_id": "never-opened", "data": {}}, "not open on the remote worker"),
    ("comm_close", {"comm_id": "never-opened", "data": {}}, "not open on the remote worker"),
    ("comm_open", {"comm_id": "mine", "target_name": "rgpu.vars", "data": {}}, "belongs to the GPU server"),
    ("comm_msg", {"data": {}}, "without a comm_id"),
])
def test_comm_messages_the_worker_cannot_take_get_a_reason(server: ServerProcess, alice: str, msg_type: str,
                                                           content: dict[str, Any], reason: str) -> None:
    async def body(session: AsyncSession) -> None:
        with pytest.raises(ServerError, match=reason) as caught:
            await session.shell_request(msg_type, content)
        assert caught.value.code == "no_comm"
        assert (await session.execute("print('usable')", lambda _: None)).stdout == "usable\n"

    _run(server, alice, body)


def test_the_servers_own_comm_is_out_of_reach(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        info = await session.shell_request("comm_info_request", {})
        (server_comm,) = [cid for cid, c in info.content["comms"].items() if c["target_name"] == "rgpu.vars"]
        with pytest.raises(ServerError, match="belongs to the GPU server"):
            await session.shell_request("comm_msg", {"comm_id": server_comm, "data": {"op": "pull", "id": 1}})
        await session.push(x=1)  # the transfers still work

    _run(server, alice, body)


def test_an_unknown_comm_target_is_closed_and_its_comm_then_refused(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        outputs: list[m.Output] = []
        await session.shell_request("comm_open", {"comm_id": "c1", "target_name": "no.such.target", "data": {}},
                                    on_output=outputs.append)
        assert [(o.msg_type, o.content["comm_id"]) for o in outputs if o.msg_type.startswith("comm")] == [
            ("comm_close", "c1")]
        with pytest.raises(ServerError, match="it was closed"):
            await session.shell_request("comm_msg", {"comm_id": "c1", "data": {}})

    _run(server, alice, body)


def test_a_widget_of_a_dead_worker_says_how_it_died(server: ServerProcess, alice: str) -> None:
    async def body(session: AsyncSession) -> None:
        outputs: list[m.Output] = []
        await session.execute("import ipywidgets as w\ns = w.IntSlider()", outputs.append)
        slider = [o.content["comm_id"] for o in outputs if o.msg_type == "comm_open"][-1]
        with pytest.raises(ServerError):
            await session.execute("import os; os._exit(7)", lambda _: None)
        with pytest.raises(ServerError, match=r"died \(exit code 7 .*run the cell that made it again"):
            await session.shell_request("comm_msg", {"comm_id": slider, "data": {"method": "update",
                                                                                  "state": {"value": 3}}})

    _run(server, alice, body)
