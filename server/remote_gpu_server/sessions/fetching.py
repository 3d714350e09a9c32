"""The notebook's files on demand: the server between a running cell and its client.

A cell that opens a file its session's folder lacks makes its worker ask
for it (see :mod:`..worker_process.fetch`). :class:`FileFetcher` passes
that on, as a :class:`~m.Fetch` under the cell's request, to the one
connection that runs the cell, and only while the cell runs and only if
that client said in its :class:`~m.Execute` that it serves files. Another
session's client is never asked: a session's fetches go to its own cell's
connection, and an answer counts only from that connection, for a fetch
still waiting.

The client's answer is an :class:`~m.Upload` naming the fetch, which
streams into the worker's data channel as the bytes arrive (the upload's
limit, ``--max-upload``, and the connection's memory apply as to any
upload; the file lands in the session's folder, under its disk limit), or
a :class:`~m.FetchRefused`, which the worker turns into the open's error.
A client that does not answer within :data:`ANSWER_TIMEOUT` seconds is
taken to refuse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.protocol.framing import Chunks

from ..worker_process.fetch import fetch_tid, refusal_reason
from ..workers.datachannel import TransferAborted

if TYPE_CHECKING:
    from ..workers.worker import Worker
    from .replier import Replier

__all__ = ["ANSWER_TIMEOUT", "FileFetcher", "MAX_WAITING"]

log = logging.getLogger("remote_gpu_server")

#: How long the client may take to start answering a fetch, in seconds.
ANSWER_TIMEOUT = 30.0
#: Fetches of one session that may wait for their client at once; the
#: worker's own code asks one at a time, so more are forged: refused.
MAX_WAITING = 8

Answer = m.Upload | m.FetchRefused


@dataclasses.dataclass(frozen=True)
class _Cell:
    worker: Worker
    conn: Replier
    req: int
    serves: bool


def _drop(msg: Answer, reason: str) -> None:
    for buf in getattr(msg, "buffers", ()):
        if isinstance(buf, Chunks):
            buf.fail(reason)


class FileFetcher:
    """One session's fetches; see the module docstring.

    Call :meth:`begin` as a cell starts and :meth:`end` when it is over;
    hand it the client's answers (:meth:`answered`).
    """

    def __init__(self) -> None:
        self._cell: _Cell | None = None
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Uploads streaming into the worker now, each with the event set when it has ended.
        self._streaming: list[tuple[m.Upload, asyncio.Event]] = []

    def begin(self, worker: Worker, conn: Replier, req: int, serves: bool) -> None:
        """Cell ``req`` of ``conn`` runs on ``worker``; ``serves``: its client sends files."""
        self._cell = _Cell(worker, conn, req, serves)
        worker.transfers.on_fetch = self._requested

    async def end(self) -> None:
        """The cell is over: its fetches still waiting are refused, and an upload
        still streaming (the cell was interrupted while it came) is cut short and
        waited for, so that the data channel is free for the next request."""
        cell, self._cell = self._cell, None
        if cell is not None and cell.worker.transfers.on_fetch == self._requested:
            cell.worker.transfers.on_fetch = None
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        for msg, ended in list(self._streaming):
            _drop(msg, "the cell that asked for this file is over")
            await ended.wait()

    def _requested(self, fetch: int, path: str) -> None:
        cell = self._cell
        if cell is None:
            return
        task = asyncio.get_running_loop().create_task(self._ask(cell, fetch, path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, cell: _Cell, fetch: int, path: str) -> None:
        """Ask the cell's client for ``path``; refuse the fetch unless it sends it."""
        transfers = cell.worker.transfers
        if not cell.serves:
            await transfers.refuse(fetch, refusal_reason(
                m.FetchRefusal.OFF.value, "this cell's client does not send files of its notebook's folder"))
            return
        if len(self._waiting) >= MAX_WAITING or fetch in self._waiting:
            await transfers.refuse(fetch, refusal_reason(
                m.FetchRefusal.REFUSED.value, f"more than {MAX_WAITING} files asked for at once"))
            return
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[fetch] = fut
        try:
            await cell.conn.send(m.Fetch(cell.req, fetch, path))
            answer = await asyncio.wait_for(fut, ANSWER_TIMEOUT)
        except TimeoutError:
            await transfers.refuse(fetch, refusal_reason(
                m.FetchRefusal.REFUSED.value,
                f"your notebook's client did not answer within {ANSWER_TIMEOUT:.0f} s"))
            return
        except asyncio.CancelledError:  # the cell ended first
            await transfers.refuse(fetch, refusal_reason(m.FetchRefusal.OFF.value, "the cell is over"))
            return
        finally:
            self._waiting.pop(fetch, None)
        if isinstance(answer, m.FetchRefused):
            code = answer.code if answer.code in {c.value for c in m.FetchRefusal} else "refused"
            await transfers.refuse(fetch, refusal_reason(code, answer.message[:1000]))
        # An Upload streams in the task of the request that carries it (answered).

    async def answered(self, msg: Answer, conn: Replier) -> None:
        """The client's answer to a fetch: an Upload streams into the worker.

        Anything that is not a waiting fetch's answer from its cell's own
        connection is dropped: it writes nothing anywhere.
        """
        cell = self._cell
        fut = self._waiting.get(msg.fetch)
        if cell is None or conn is not cell.conn or fut is None or fut.done():
            _drop(msg, "no fetch of this connection's cell waits for this answer")
            return
        if isinstance(msg, m.Upload) and len(msg.buffers) != 1:
            _drop(msg, "a fetch's answer carries one file")
            msg = m.FetchRefused(msg.req, msg.fetch, m.FetchRefusal.REFUSED.value,
                                 "the client sent a fetch's answer that is not one file")
        fut.set_result(msg)
        if isinstance(msg, m.Upload):
            streaming = (msg, asyncio.Event())
            self._streaming.append(streaming)
            try:
                await cell.worker.transfers.data.send(fetch_tid(msg.fetch), list(msg.buffers), cell.worker)
            except (TransferAborted, WorkerDied) as exc:
                log.info("a fetched file did not reach its worker: %s", exc)
            finally:
                self._streaming.remove(streaming)
                streaming[1].set()
