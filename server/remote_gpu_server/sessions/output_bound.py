"""What one cell may keep in the output journal: ``rgpu serve --max-output``.

Every output message still reaches the client as it happens; the bound is
on what the store keeps (what a reconnecting client replays, what ``rgpu
logs`` shows). Of each cell (or batch job attempt) the journal keeps the
first half of the bound as it comes (the head) and, of the rest, only the
latest output that fits in the other half (the tail, held in memory until
the cell ends), with a line between them that says how much was not kept.
So a cell that prints 300 MiB grows the store by about the bound, not by
300 MiB, and other users' cells do not wait behind its writes: Jupyter's
IOPub rate limit, minus the loss on the screen.

ipykernel sends what a cell prints in 0.2 s as one stream message, which
can be megabytes: stream messages are cut, so the head ends with the start
of the message that did not fit (the *boundary*) and the tail may begin
with the end of one. Other messages (a plot, a widget's) are kept whole or
not at all. Every row keeps its own sequence number, so the journal stays
in order: the line goes at the end of the boundary's text (the boundary
and its own end are one row again), else in a row of its own numbered as
the first message not kept, else at the start of the cut message that
begins the tail.

Sans-I/O: :meth:`OutputBound.add` takes a row and returns the rows to
journal now; :meth:`OutputBound.flush` returns what it holds (at a cell's
end, and before a replay, a park or a release); :meth:`OutputBound.reset`
does that and opens a fresh head for the next cell. Output that comes
between cells (a background thread's) counts with the cell before it.
"""

from __future__ import annotations

import collections
import dataclasses
import json

from remote_gpu_core.sizes import format_size
from ..store import OutputRow

__all__ = ["ROW_OVERHEAD", "OutputBound", "row_size"]

#: What a row costs the store besides its content (its key, type, index entry).
ROW_OVERHEAD = 64


def row_size(row: OutputRow) -> int:
    """About how many bytes ``row`` takes in the store."""
    if row.msg_type == "stream":
        return len(_text(row)) + ROW_OVERHEAD
    return len(json.dumps(row.content, default=str)) + ROW_OVERHEAD


def _text(row: OutputRow) -> str:
    return str(row.content.get("text", ""))


def _with_text(row: OutputRow, text: str) -> OutputRow:
    return dataclasses.replace(row, content={**row.content, "text": text})


class OutputBound:
    """One session's bound (``limit`` bytes per cell; None: keep everything)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._head_left = 0 if limit is None else limit // 2
        self._tail_limit = 0 if limit is None else limit - limit // 2
        self._head_open = True
        self._boundary: OutputRow | None = None  # the start of the stream row the head ended in
        self._tail: collections.deque[OutputRow] = collections.deque()
        self._tail_size = 0
        self._first_dropped: OutputRow | None = None  # the first whole row not kept
        self._dropped = 0  # bytes not kept since the last flush

    def add(self, row: OutputRow) -> list[OutputRow]:
        """The rows to journal now for ``row`` (``[row]``, or none: held, or not kept)."""
        if self.limit is None:
            return [row]
        if self._head_open:
            size = row_size(row)
            if size <= self._head_left:
                self._head_left -= size
                return [row]
            self._head_open = False  # what comes after the head goes, in order, to the tail
            cut = self._head_left - ROW_OVERHEAD
            if row.msg_type == "stream" and cut > 0:
                text = _text(row)
                self._boundary = _with_text(row, text[:cut])
                row = _with_text(row, text[cut:])  # its end: the tail's first row, same number
        self._tail.append(row)
        self._tail_size += row_size(row)
        self._trim()
        return []

    def _trim(self) -> None:
        """Drop the oldest of the tail until it fits: whole rows, or the start of a stream row."""
        while self._tail and self._tail_size > self._tail_limit:
            first, excess = self._tail[0], self._tail_size - self._tail_limit
            if first.msg_type == "stream" and len(_text(first)) > excess:
                self._tail[0] = _with_text(first, _text(first)[excess:])
                self._tail_size -= excess
                self._dropped += excess
                return
            self._tail.popleft()
            self._tail_size -= row_size(first)
            self._dropped += row_size(first) - ROW_OVERHEAD
            is_boundary_end = self._boundary is not None and first.seq == self._boundary.seq
            if self._first_dropped is None and not is_boundary_end:
                self._first_dropped = first

    def _line(self) -> str:
        assert self.limit is not None
        return (f"\n[{format_size(self._dropped)} of output not kept here: this server keeps the first and "
                f"the last {format_size(self.limit // 2)} of each cell's output (rgpu serve --max-output); "
                "all of it was sent as it came]\n")

    def flush(self) -> list[OutputRow]:
        """What the bound holds, to journal now: the boundary, the line for what was
        not kept (if anything was not), the tail."""
        tail, rows = list(self._tail), []
        line = self._line() if self._dropped else ""
        if self._boundary is not None:
            text = _text(self._boundary) + line
            if tail and tail[0].seq == self._boundary.seq:  # its own end is still there: one row again
                text += _text(tail.pop(0))
            rows.append(_with_text(self._boundary, text))
        elif line and self._first_dropped is not None:
            first = self._first_dropped
            rows.append(OutputRow(first.session, first.seq, first.job, "stream", {"name": "stderr", "text": line}))
        elif line and tail:  # only the start of the tail's first (stream) row went
            tail[0] = _with_text(tail[0], line.lstrip("\n") + _text(tail[0]))
        rows += tail
        self._boundary = None
        self._tail.clear()
        self._tail_size = 0
        self._first_dropped, self._dropped = None, 0
        return rows

    def reset(self) -> list[OutputRow]:
        """:meth:`flush`, then a fresh head: a new cell begins."""
        rows = self.flush()
        if self.limit is not None:
            self._head_left = self.limit // 2
            self._head_open = True
        return rows
