"""A large push, pull, upload or download, told as one line that is updated in place.

:class:`~.session.AsyncSession` reports each push, pull, upload and download it makes to its
``on_progress`` as :class:`TransferProgress` events: at most one every
:data:`REPORT_EVERY` seconds while the bytes move (through a
:class:`Throttle`, so the per-frame hooks of the link stay cheap), and one
``finished`` event at the end. What to show of them is decided here, once
for the magic, the Remote GPU kernel and the Python API:

- :class:`ProgressLines` turns the events into one line per transfer
  (bytes done of all, rate, time left; then ``pushed 1 GiB in 3.2 s, 330
  MiB/s``, or ``push stopped at 450 MiB of 1 GiB (43 %)`` where it ended
  unfinished: no line is left saying that it still runs), shown only for a transfer of at least
  :data:`~.notices.PROGRESS_FROM` bytes that has run for
  :data:`SHOW_AFTER` seconds: a small or quick one shows nothing.
- Where the line goes is a ``show(key, text, final)`` callable: a
  :class:`~.notices.StatusLine` per transfer in Jupyter (one
  ``display_data``, then ``update_display_data`` with its ``display_id``)
  or :class:`TerminalLine` (``\\r`` on a terminal).

``RGPU_PROGRESS=0`` (or ``off``, ``no``, ``false``) turns the lines off
(:func:`progress_wanted`), as does a silent Jupyter request.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from remote_gpu_core.sizes import format_size

from . import notices

__all__ = [
    "OUTGOING", "REPORT_EVERY", "SHOW_AFTER", "BytesHook", "DisplayLines", "ProgressCallback", "ProgressLines",
    "Shower", "TerminalLine", "Throttle", "TransferProgress", "both", "default_progress", "finished_text",
    "progress_text", "progress_wanted", "stopped_text",
]

#: Seconds between two reports of one transfer while it runs.
REPORT_EVERY = 0.2
#: A transfer shows its line once it has run this long (a quicker one shows none).
SHOW_AFTER = 0.5
_OFF = ("0", "off", "no", "false")


@dataclasses.dataclass(frozen=True)
class TransferProgress:
    """Where one push or pull (request ``req`` of its link) stands.

    ``verb`` is ``"push"``, ``"pull"``, ``"upload"`` or ``"download"``; ``done``
    of ``total`` bytes have crossed (a message's frames: the variables' or
    files' buffers and their header)
    in ``seconds`` since it began; ``finished``: it is over and ``done`` is all;
    ``stopped``: it ended before that (an interrupt, a lost connection) and
    ``done`` is how far it got.
    ``had``: of ``done``, the bytes that were there before it began (a push
    resumed after a cut: they are not sent again, nor counted in its rate).
    """

    req: int
    verb: str
    done: int
    total: int
    seconds: float
    finished: bool = False
    had: int = 0
    stopped: bool = False

    @property
    def rate(self) -> float:
        """Bytes per second moved by this transfer itself."""
        return (self.done - self.had) / self.seconds if self.seconds > 0 else 0.0


#: ``on_progress(event)``: told of each large transfer of a session.
ProgressCallback = Callable[[TransferProgress], Any]
#: ``hook(done, total)``: the bytes of one message's frames, as :meth:`.Link.send` reports them.
BytesHook = Callable[[int, int], Any]
#: The verbs whose bytes are a request's (the others' are its answer's).
OUTGOING = frozenset({"push", "upload"})
#: ``show(key, text, final)``: shows ``text`` as the line of transfer ``key``
#: (replacing what it showed before); ``final``: the line's last text.
Shower = Callable[[int, str, bool], Any]


def progress_wanted() -> bool:
    """Whether ``RGPU_PROGRESS`` leaves progress lines on (the default)."""
    return (os.environ.get("RGPU_PROGRESS") or "").strip().lower() not in _OFF


class Throttle:
    """The ``(done, total)`` hook of one transfer's frames (see :meth:`.Link.send`),
    passed on to ``report`` as :class:`TransferProgress` at most every
    :data:`REPORT_EVERY` seconds; :meth:`finish` reports its end. ``had``: bytes
    of the whole that the other end held before (a resumed push), counted as done."""

    def __init__(self, req: int, verb: str, report: ProgressCallback,
                 clock: Callable[[], float] = time.monotonic, had: int = 0) -> None:
        self.req, self.verb, self._report, self._clock, self.had = req, verb, report, clock, had
        #: When its first frame moved (a pull's answer may come long after
        #: its request, behind a cell): the time is counted from there.
        self.started = self._last = 0.0
        self.done = self.total = 0
        #: It reported its end (:meth:`finish` or :meth:`stop`).
        self.ended = False

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if not self.total:
            self.started = self._last = now
        self.done, self.total = done, total
        if now - self._last >= REPORT_EVERY and done < total:
            self._last = now
            self._report(TransferProgress(self.req, self.verb, self.had + done, self.had + total,
                                          now - self.started, had=self.had))

    def finish(self) -> None:
        """The transfer is over: report it once, whole (nothing for one that carried no frame)."""
        if self.total and not self.ended:
            self.ended = True
            whole = self.had + self.total
            self._report(TransferProgress(self.req, self.verb, whole, whole, self._clock() - self.started,
                                          finished=True, had=self.had))

    def stop(self) -> None:
        """The transfer ended without :meth:`finish` (an error, a cancel): report where
        it stopped, once (nothing for one that carried no frame, or that finished)."""
        if self.total and not self.ended:
            self.ended = True
            self._report(TransferProgress(self.req, self.verb, self.had + self.done, self.had + self.total,
                                          self._clock() - self.started, had=self.had, stopped=True))


def both(first: BytesHook | None, second: BytesHook | None) -> BytesHook | None:
    """One hook that calls ``first`` and ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second

    def hook(done: int, total: int) -> None:
        first(done, total)
        second(done, total)

    return hook


def _duration(seconds: float) -> str:
    """``3.2 s``, ``45 s``, ``2 min 5 s``, ``2 h 50 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds + 0.5), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def progress_text(event: TransferProgress) -> str:
    """``Remote GPU: pushing 450 MiB of 1 GiB (43 %), 330 MiB/s, 1.7 s left``."""
    share = 100 * event.done // event.total if event.total else 100
    rate = event.rate
    left = f", {_duration((event.total - event.done) / rate)} left" if rate else ""
    return (f"{notices.PREFIX}{event.verb}ing {format_size(event.done)} of {format_size(event.total)} "
            f"({share} %), {format_size(rate)}/s{left}")


def stopped_text(event: TransferProgress) -> str:
    """``Remote GPU: push stopped at 450 MiB of 1 GiB (43 %)``."""
    share = 100 * event.done // event.total if event.total else 100
    return (f"{notices.PREFIX}{event.verb} stopped at {format_size(event.done)} of {format_size(event.total)} "
            f"({share} %)")


def finished_text(event: TransferProgress) -> str:
    """``Remote GPU: pushed 1 GiB in 3.2 s, 330 MiB/s``; after a cut, ``(512 MiB of it had arrived before)``."""
    had = f" ({format_size(event.had)} of it had arrived before)" if event.had else ""
    return (f"{notices.PREFIX}{event.verb}ed {format_size(event.total)} in {_duration(event.seconds)}, "
            f"{format_size(event.rate)}/s{had}")


class ProgressLines:
    """Shows the :class:`TransferProgress` events of large transfers through
    ``show`` (see the module docstring); call it with each event."""

    def __init__(self, show: Shower, *, least: int = notices.PROGRESS_FROM, after: float = SHOW_AFTER) -> None:
        self._show = show
        self._least, self._after = least, after
        self._shown: set[int] = set()

    def __call__(self, event: TransferProgress) -> None:
        if event.total < self._least:
            return
        shown = event.req in self._shown
        if event.stopped:
            # Its running line, if it showed one, says where it stopped instead.
            if shown:
                self._shown.discard(event.req)
                self._show(event.req, stopped_text(event), True)
            return
        if event.finished:
            # One that ran long but had no report in between still says what it did.
            if shown or event.seconds >= self._after:
                self._shown.discard(event.req)
                self._show(event.req, finished_text(event), True)
            return
        if shown or event.seconds >= self._after:
            self._shown.add(event.req)
            self._show(event.req, progress_text(event), False)


class TerminalLine:
    """A :data:`Shower` for a terminal: the line rewritten after ``\\r``, ended
    with a newline by its final text."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._width = 0

    def __call__(self, key: int, text: str, final: bool) -> None:
        pad = " " * max(0, self._width - len(text))
        self._width = 0 if final else len(text)
        end = "\n" if final else ""
        self._stream.write(f"\r{text}{pad}{end}")
        self._stream.flush()


class DisplayLines:
    """A :data:`Shower` for Jupyter: each transfer's line is a
    :class:`~.notices.StatusLine` sent through ``publish`` (one
    ``display_data``, then updates of its ``display_id``)."""

    def __init__(self, publish: notices.Publish) -> None:
        self._publish = publish
        self._lines: dict[int, notices.StatusLine] = {}

    def __call__(self, key: int, text: str, final: bool) -> None:
        line = self._lines.setdefault(key, notices.StatusLine(self._publish))
        line.show(text)
        if final:
            del self._lines[key]


def default_progress() -> ProgressCallback | None:
    """Where the Python API shows a large transfer unless told otherwise: in the
    cell, when it runs inside a Jupyter kernel; else on a terminal's stderr;
    else (or with ``RGPU_PROGRESS=0``) nowhere."""
    if not progress_wanted():
        return None
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if getattr(shell, "kernel", None) is not None:
        return ProgressLines(DisplayLines(notices.publish_display))
    if sys.stderr is not None and sys.stderr.isatty():
        return ProgressLines(TerminalLine())
    return None
