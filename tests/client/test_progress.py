"""What a push or pull says of its progress (:mod:`remote_gpu_kernel.progress`), with an injected clock."""

from __future__ import annotations

import io

import pytest

from remote_gpu_kernel import notices
from remote_gpu_kernel.progress import (
    ProgressLines, TerminalLine, Throttle, TransferProgress, default_progress, finished_text, progress_text,
    progress_wanted, stopped_text,
)

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_reports_at_most_every_fifth_of_a_second_and_once_at_the_end() -> None:
    clock, events = Clock(), []
    throttle = Throttle(7, "push", events.append, clock)
    for frame in range(1, 101):  # 100 frames of 1 MiB, 20 ms apart: 2 s
        clock.now += 0.02
        throttle(frame * MiB, 100 * MiB)
    throttle.finish()
    *running, last = events
    assert 8 <= len(running) <= 10, "one report per 0.2 s, not one per frame"
    assert all(not e.finished and e.req == 7 and e.verb == "push" for e in running)
    assert [e.done for e in running] == sorted(e.done for e in running)
    assert last == TransferProgress(7, "push", 100 * MiB, 100 * MiB, pytest.approx(1.98), finished=True)


def test_time_counts_from_the_first_frame_not_from_the_request() -> None:
    clock, events = Clock(), []
    throttle = Throttle(1, "pull", events.append, clock)
    clock.now += 30  # a cell ran before the pull's answer came
    throttle(MiB, 10 * MiB)
    clock.now += 1
    throttle(10 * MiB, 10 * MiB)
    throttle.finish()
    assert events[-1].seconds == pytest.approx(1.0)


def test_a_transfer_with_no_frame_reports_nothing() -> None:
    events: list[TransferProgress] = []
    Throttle(1, "push", events.append, Clock()).finish()
    assert events == []


def test_the_line_shows_bytes_rate_and_time_left_then_what_it_did() -> None:
    running = TransferProgress(1, "push", 256 * MiB, 1024 * MiB, 0.8)
    assert progress_text(running) == "Remote GPU: pushing 256 MiB of 1 GiB (25 %), 320 MiB/s, 2.4 s left"
    done = TransferProgress(1, "pull", 1024 * MiB, 1024 * MiB, 3.2, finished=True)
    assert finished_text(done) == "Remote GPU: pulled 1 GiB in 3.2 s, 320 MiB/s"
    slow = TransferProgress(1, "push", MiB, 1024 * MiB, 10.0)
    assert progress_text(slow) == "Remote GPU: pushing 1 MiB of 1 GiB (0 %), 102 KiB/s, 2 h 50 min left"


def test_a_resumed_push_counts_what_had_arrived_as_done_but_not_in_its_rate() -> None:
    clock, events = Clock(), []
    throttle = Throttle(2, "push", events.append, clock, had=768 * MiB)
    clock.now += 0.1
    throttle(0, 256 * MiB)
    for step in range(1, 5):  # 256 MiB in 0.8 s: 320 MiB/s
        clock.now += 0.2
        throttle(step * 64 * MiB, 256 * MiB)
    throttle.finish()
    running, last = events[0], events[-1]
    assert (running.done, running.total, running.had) == (832 * MiB, 1024 * MiB, 768 * MiB)
    assert progress_text(running) == "Remote GPU: pushing 832 MiB of 1 GiB (81 %), 320 MiB/s, 0.6 s left"
    assert (last.done, last.total, last.finished) == (1024 * MiB, 1024 * MiB, True)
    assert finished_text(last) == "Remote GPU: pushed 1 GiB in 0.8 s, 320 MiB/s (768 MiB of it had arrived before)"


def test_a_transfer_that_ends_unfinished_reports_where_it_stopped_once() -> None:
    clock, events = Clock(), []
    throttle = Throttle(5, "push", events.append, clock, had=MiB)
    for step in range(1, 4):
        clock.now += 0.25
        throttle(step * MiB, 10 * MiB)
    throttle.stop()
    throttle.stop()
    throttle.finish()
    last = events[-1]
    assert [e.stopped for e in events] == [False, False, True], "one report of its end, and no other"
    assert last == TransferProgress(5, "push", 4 * MiB, 11 * MiB, pytest.approx(0.5), had=MiB, stopped=True)
    assert stopped_text(last) == "Remote GPU: push stopped at 4 MiB of 11 MiB (36 %)"


def test_a_finished_or_empty_transfer_does_not_report_a_stop() -> None:
    events: list[TransferProgress] = []
    Throttle(1, "pull", events.append, Clock()).stop()
    assert events == []
    finished = Throttle(2, "pull", events.append, Clock())
    finished(MiB, MiB)
    finished.finish()
    finished.stop()
    assert [(e.finished, e.stopped) for e in events] == [(True, False)]


def _shown(events: list[TransferProgress]) -> list[tuple[int, str, bool]]:
    out: list[tuple[int, str, bool]] = []
    lines = ProgressLines(lambda key, text, final: out.append((key, text, final)))
    for event in events:
        lines(event)
    return out


def test_a_large_slow_transfer_shows_one_line_updated_then_finalized() -> None:
    total = 64 * MiB
    shown = _shown([TransferProgress(3, "push", 8 * MiB, total, 0.3),  # too early to show
                    TransferProgress(3, "push", 16 * MiB, total, 0.6),
                    TransferProgress(3, "push", 32 * MiB, total, 0.9),
                    TransferProgress(3, "push", total, total, 1.6, finished=True)])
    assert [key for key, _, _ in shown] == [3, 3, 3]
    assert [final for _, _, final in shown] == [False, False, True]
    assert shown[0][1].startswith("Remote GPU: pushing 16 MiB of 64 MiB (25 %)")
    assert shown[-1][1] == "Remote GPU: pushed 64 MiB in 1.6 s, 40 MiB/s"


def test_a_small_or_quick_transfer_shows_nothing() -> None:
    small = notices.PROGRESS_FROM - 1
    assert _shown([TransferProgress(1, "push", 1, small, 5.0),
                   TransferProgress(1, "push", small, small, 9.0, finished=True)]) == []
    large = 1 << 30
    assert _shown([TransferProgress(2, "pull", large // 2, large, 0.2),
                   TransferProgress(2, "pull", large, large, 0.4, finished=True)]) == []


def test_a_long_transfer_with_no_report_on_the_way_still_says_what_it_did() -> None:
    total = 64 * MiB
    shown = _shown([TransferProgress(4, "pull", total, total, 0.9, finished=True)])
    assert shown == [(4, "Remote GPU: pulled 64 MiB in 0.9 s, 71.1 MiB/s", True)]


def test_two_transfers_have_a_line_each() -> None:
    total = 32 * MiB
    shown = _shown([TransferProgress(1, "push", MiB, total, 0.6), TransferProgress(2, "pull", MiB, total, 0.6),
                    TransferProgress(1, "push", total, total, 1.0, True),
                    TransferProgress(2, "pull", total, total, 1.0, True)])
    assert [(key, final) for key, _, final in shown] == [(1, False), (2, False), (1, True), (2, True)]


def test_a_line_shown_for_a_transfer_that_stopped_says_where_it_stopped_and_ends() -> None:
    total = 64 * MiB
    shown = _shown([TransferProgress(6, "pull", 16 * MiB, total, 0.6),
                    TransferProgress(6, "pull", 24 * MiB, total, 0.9, stopped=True),
                    TransferProgress(7, "push", MiB, total, 0.1),  # never shown: its stop shows nothing
                    TransferProgress(7, "push", 2 * MiB, total, 0.2, stopped=True)])
    assert [(key, final) for key, _, final in shown] == [(6, False), (6, True)]
    assert shown[-1][1] == "Remote GPU: pull stopped at 24 MiB of 64 MiB (37 %)"


def test_on_a_terminal_the_line_is_rewritten_in_place_and_ended_once() -> None:
    out = io.StringIO()
    line = TerminalLine(out)
    line(1, "Remote GPU: pushing 16 MiB of 64 MiB (25 %)", False)
    line(1, "Remote GPU: pushed 64 MiB", True)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 2
    last = text.rsplit("\r", 1)[1]
    assert last.startswith("Remote GPU: pushed 64 MiB") and len(last.rstrip("\n")) == len(
        "Remote GPU: pushing 16 MiB of 64 MiB (25 %)"), "the longer line before is blanked out"


@pytest.mark.parametrize("value", ["0", "off", "No", "false"])
def test_rgpu_progress_off_is_quiet(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RGPU_PROGRESS", value)
    assert not progress_wanted()
    assert default_progress() is None


def test_progress_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RGPU_PROGRESS", raising=False)
    assert progress_wanted()
