"""The server's table of a worker's comms, without sockets: one rule per test."""

from __future__ import annotations

from remote_gpu_server.workers.comms import CommTable


def test_a_comm_the_worker_opened_takes_messages_until_either_side_closes_it() -> None:
    table = CommTable(reserved="rgpu-w1")
    assert table.refusal("comm_msg", {"comm_id": "w"}) is not None
    table.published("comm_open", {"comm_id": "w", "target_name": "jupyter.widget"})
    assert table.refusal("comm_msg", {"comm_id": "w"}) is None
    table.sent("comm_close", {"comm_id": "w"})
    assert "it was closed" in (table.refusal("comm_msg", {"comm_id": "w"}) or "")
    table.published("comm_open", {"comm_id": "v"})
    table.published("comm_close", {"comm_id": "v"})
    assert table.refusal("comm_msg", {"comm_id": "v"}) is not None


def test_the_servers_own_comm_and_target_are_out_of_reach() -> None:
    table = CommTable(reserved="rgpu-w1")
    table.published("comm_open", {"comm_id": "rgpu-w1"})  # never counted as the user's
    assert "belongs to the GPU server" in (table.refusal("comm_msg", {"comm_id": "rgpu-w1"}) or "")
    assert "belongs to the GPU server" in (
        table.refusal("comm_open", {"comm_id": "mine", "target_name": "rgpu.vars"}) or "")


def test_a_notebook_opened_comm_is_open_unless_the_worker_refuses_it() -> None:
    table = CommTable(reserved="rgpu-w1")
    assert table.refusal("comm_open", {"comm_id": "ctl", "target_name": "jupyter.widget.control"}) is None
    table.sent("comm_open", {"comm_id": "ctl", "target_name": "jupyter.widget.control"})
    assert table.refusal("comm_msg", {"comm_id": "ctl"}) is None
    assert "already open" in (table.refusal("comm_open", {"comm_id": "ctl", "target_name": "x"}) or "")
    table.published("comm_close", {"comm_id": "ctl"})  # no such target on the worker
    assert table.refusal("comm_msg", {"comm_id": "ctl"}) is not None


def test_the_comms_of_a_dead_worker_say_how_it_died() -> None:
    old = CommTable(reserved="rgpu-w1")
    old.published("comm_open", {"comm_id": "slider"})
    new = CommTable(reserved="rgpu-w2")
    new.inherit(old, "died (signal SIGKILL)")
    refusal = new.refusal("comm_msg", {"comm_id": "slider"}) or ""
    assert "died (signal SIGKILL)" in refusal and "run the cell that made it again" in refusal
    newer = CommTable(reserved="rgpu-w3")
    newer.inherit(new, "died (exit code 1)")
    assert "SIGKILL" in (newer.refusal("comm_msg", {"comm_id": "slider"}) or "")


def test_a_message_without_a_comm_id_is_refused() -> None:
    assert CommTable().refusal("comm_msg", {}) == "comm_msg without a comm_id"
