"""``--max-output``: the journal keeps a head and a tail of a cell's output, the client gets it all.

The bound itself is sans-I/O (rows in, rows to journal out); then, on a real
server with each store backend, a cell that prints far more than the bound:
its client gets every byte as it comes, a client that replays the journal
gets the head, a line saying how much was not kept, and the tail, and the
store grows by about the bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_gpu_kernel import Client
from remote_gpu_core.ids import JobId, SessionId
from remote_gpu_server.sessions.output_bound import ROW_OVERHEAD, OutputBound
from remote_gpu_server.store import OutputRow
from postgres import BACKENDS
from servers import ServerProcess
from stores import execute_raw

SESSION = SessionId("s1")


def line(seq: int, size: int = 100 - ROW_OVERHEAD) -> OutputRow:
    """A stream row that costs the bound 100 bytes."""
    return OutputRow(SESSION, seq, JobId(7), "stream", {"name": "stdout", "text": f"{seq:0{size}d}"})


def journal(bound: OutputBound, rows: list[OutputRow]) -> list[OutputRow]:
    """What reaches the journal of ``rows`` through ``bound``, the cell's end included."""
    kept = [k for row in rows for k in bound.add(row)]
    return kept + bound.flush()


def test_without_a_bound_every_row_is_journaled_at_once() -> None:
    bound = OutputBound(None)
    rows = [line(i) for i in range(1, 1000)]
    assert [k for row in rows for k in bound.add(row)] == rows and bound.flush() == []


def test_a_cell_within_the_bound_is_journaled_as_it_comes() -> None:
    bound = OutputBound(1000)
    assert [bound.add(line(i)) for i in range(1, 6)] == [[line(i)] for i in range(1, 6)]
    assert bound.flush() == []


def test_past_the_bound_the_journal_keeps_head_line_and_tail_in_order() -> None:
    bound = OutputBound(1000)  # head 500 bytes (5 rows), tail 500 bytes (5 rows)
    kept = journal(bound, [line(i) for i in range(1, 101)])
    assert [r.seq for r in kept] == [1, 2, 3, 4, 5, 6, 96, 97, 98, 99, 100]
    assert kept[:5] == [line(i) for i in range(1, 6)] and kept[6:] == [line(i) for i in range(96, 101)]
    note = kept[5]  # takes the number of the first row not kept
    assert note.msg_type == "stream" and note.content["name"] == "stderr" and note.job == JobId(7)
    assert "3.16 KiB of output not kept here" in str(note.content["text"])  # 90 rows of 36 characters
    assert "(rgpu serve --max-output)" in str(note.content["text"])


def test_a_new_cell_gets_a_fresh_head_and_the_old_tail_first() -> None:
    bound = OutputBound(1000)
    held = [k for i in range(1, 21) for k in bound.add(line(i))]
    assert [r.seq for r in held] == [1, 2, 3, 4, 5]
    before_next = bound.reset()
    assert [r.seq for r in before_next] == [6, 16, 17, 18, 19, 20]
    assert bound.add(line(21)) == [line(21)]


def test_output_between_cells_counts_with_the_cell_before() -> None:
    bound = OutputBound(1000)
    journal(bound, [line(i) for i in range(1, 11)])  # the cell ends: its head is spent
    assert bound.add(line(11)) == []  # a background thread's print: held in the tail
    assert [r.seq for r in bound.flush()] == [11]  # a replay, a park or a release writes it


def test_one_huge_stream_message_keeps_its_start_and_end_in_one_row() -> None:
    bound = OutputBound(1000)
    text = "".join(f"{i:05d}" for i in range(1000))  # 5000 characters in one message
    [kept] = journal(bound, [OutputRow(SESSION, 1, None, "stream", {"name": "stdout", "text": text})])
    head, _, rest = str(kept.content["text"]).partition("\n[")
    note, _, end = rest.partition("]\n")
    assert head == text[:436] and end == text[-436:]  # 500 bytes each, less a row's cost
    assert note.startswith("4.03 KiB of output not kept here") and kept.seq == 1


def test_the_tail_keeps_the_end_of_a_message_and_the_line_starts_it() -> None:
    bound = OutputBound(1000)
    text = "".join(f"{i:05d}" for i in range(200))  # 1000 characters
    kept = journal(bound, [*(line(i) for i in range(1, 6)),
                           OutputRow(SESSION, 6, None, "stream", {"name": "stdout", "text": text})])
    # The head is full to the byte: nothing of row 6 starts it, the tail keeps its end.
    assert [r.seq for r in kept] == [1, 2, 3, 4, 5, 6]
    tail = str(kept[5].content["text"])
    assert tail.startswith("[564 bytes of output not kept") and tail.endswith("]\n" + text[-436:])


def test_a_message_larger_than_the_tail_is_not_kept_and_counted() -> None:
    bound = OutputBound(1000)
    assert journal(bound, [line(1)]) == [line(1)]
    big = OutputRow(SESSION, 2, None, "display_data", {"data": {"image/png": "A" * 2000}})
    kept = journal(bound, [big])  # between cells, in the spent head's tail
    assert [r.seq for r in kept] == [2] and kept[0].msg_type == "stream"
    assert "of output not kept" in str(kept[0].content["text"])


def quiet(_: Any) -> None:
    pass


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_a_cell_that_prints_past_max_output_streams_all_and_journals_head_and_tail(
        fresh_server: ServerProcess) -> None:
    fresh_server.args = ["--max-output", "64K"]
    fresh_server.start()
    token = fresh_server.token()

    def journal_bytes() -> int:
        [(total,)] = execute_raw(fresh_server.db, "SELECT COALESCE(SUM(LENGTH(content)), 0) FROM outputs")
        return int(total)

    with Client(fresh_server.url, token).session() as s:
        assert s.execute("print('warm')", on_output=quiet).ok
        before = journal_bytes()
        # 4 MiB in 4096 lines of 1 KiB, each naming its number.
        shown: list[str] = []
        result = s.execute("import sys\nfor i in range(4096):\n    sys.stdout.write(f'{i:08d}' + 'x' * 1015 + "
                           "'\\n')\nprint('the end')",
                           on_output=lambda o: shown.append(str(o.content.get("text", ""))))
        assert result.ok, result.error
        printed = "".join(shown)
        assert len(printed) == 4096 * 1024 + len("the end\n")  # the client got every byte as it came
        assert printed.startswith("00000000x") and printed.endswith("00004095" + "x" * 1015 + "\nthe end\n")

        replayed = "".join(str(o.content.get("text", "")) for o in s.replay(0) if o.msg_type == "stream")
        head, sep, tail = replayed.partition(" of output not kept here")
        assert sep, replayed[:200]
        assert head.startswith("warm\n00000000x") and tail.endswith("00004095" + "x" * 1015 + "\nthe end\n")
        assert "MiB" in head[-12:] and "(rgpu serve --max-output)" in tail
        assert 16 << 10 < len(head) < 48 << 10 and 16 << 10 < len(tail) < 48 << 10
        grown = journal_bytes() - before
        assert 32 << 10 < grown < 96 << 10, grown  # about the bound, not 4 MiB


def test_a_bad_max_output_stops_the_start_and_says_why(tmp_path: Path) -> None:
    for value, said in (("lots", "'lots' is not a size"), ("1K", "'1K' is too small for one cell's output")):
        done = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--db",
                               str(tmp_path / "rgpu.sqlite3"), "--max-output", value],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and f"rgpu serve: --max-output: {said}" in done.stderr
