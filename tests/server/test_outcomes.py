"""A request that follows another runs only if that one succeeded, as its answer said (no I/O)."""

from __future__ import annotations

from remote_gpu_core.protocol import messages as m
from remote_gpu_server.connections.outcomes import Outcomes


def test_a_follower_of_a_push_that_succeeded_may_run() -> None:
    outcomes = Outcomes()
    outcomes.expect(1)
    outcomes.answered(m.Notice(1, "the worker was restarted"))  # not a final answer
    assert outcomes.refusal(1, 2) == "not run: request 1, which it follows, has not finished"
    outcomes.answered(m.PushDone(1, ["a"]))
    assert outcomes.refusal(1, 2) is None


def test_a_follower_of_a_request_that_failed_is_refused_whatever_the_failure() -> None:
    outcomes = Outcomes()
    for req in (1, 2, 3, 4):
        outcomes.expect(req)
    outcomes.answered(m.Error(1, m.ErrorCode.SERIALIZATION, "FileNotFoundError: x"))
    outcomes.answered(m.ExecuteDone(2, job=7, status="error", ename="ZeroDivisionError"))
    outcomes.settle(3)  # its handler ended without a final answer (an exception, a closed connection)
    outcomes.failed(4)  # refused at the door: over a limit, too many in flight
    for req in (1, 2, 3, 4):
        assert outcomes.refusal(req, 10) == f"not run: request {req}, which it follows, failed"


def test_an_answer_once_given_is_not_changed_by_later_messages() -> None:
    outcomes = Outcomes()
    outcomes.expect(1)
    outcomes.answered(m.ExecuteDone(1, job=7, status="ok"))
    outcomes.answered(m.Error(1, m.ErrorCode.INTERNAL, "late"))
    outcomes.settle(1)
    assert outcomes.refusal(1, 2) is None


def test_a_follower_of_an_unknown_or_forgotten_request_is_refused() -> None:
    outcomes = Outcomes(keep=2)
    outcomes.answered(m.PushDone(5, ["a"]))  # never expected: not a request in turn
    assert outcomes.refusal(5, 6) is not None and "not an earlier request" in str(outcomes.refusal(5, 6))
    for req in (1, 2, 3):
        outcomes.expect(req)
        outcomes.answered(m.PushDone(req, []))
    assert outcomes.refusal(1, 4) is not None  # the oldest is forgotten: the table is bounded
    assert outcomes.refusal(3, 4) is None
    assert outcomes.refusal(3, 3) is not None  # a request cannot follow itself
    assert outcomes.follows(0, 4) is None
    follows = outcomes.follows(3, 4)
    assert follows is not None and follows() is None


def test_an_interrupt_fails_what_is_not_answered_yet_so_nothing_that_follows_it_runs() -> None:
    outcomes = Outcomes()
    outcomes.expect(1)
    outcomes.answered(m.PushDone(1, ["a"]))
    outcomes.expect(2)  # the push of the next cell, still loading in the worker
    outcomes.expect(3)  # its cell, waiting its turn
    outcomes.interrupt()
    outcomes.answered(m.PushDone(2, ["b"]))  # the push ends well, too late
    assert outcomes.refusal(1, 4) is None
    assert outcomes.refusal(2, 3) == "not run: request 2, which it follows, was interrupted"
    assert outcomes.refusal(3, 4) == "not run: request 3, which it follows, was interrupted"
