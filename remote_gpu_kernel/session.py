"""A leased GPU session of the asyncio client, and what its requests return.

:class:`AsyncSession` sends requests over its :class:`Link` and reads the
answers from each request's inbox: cells (:meth:`~AsyncSession.execute`),
variables (:meth:`~AsyncSession.push`, :meth:`~AsyncSession.pull`), a cell
with its variables in one round trip (:meth:`~AsyncSession.run`), files
(:meth:`~AsyncSession.upload`, :meth:`~AsyncSession.download`), other
Jupyter requests, parking and the end. :class:`ExecuteResult` (from
:mod:`.results`) is what a cell did.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from remote_gpu_core.errors import (
    ConnectionLost, FileTransferError, ProtocolError, RemoteError, RemoteGpuError, ServerError, SessionReleased
)
from remote_gpu_core.protocol import messages as m

from . import files as _files
from .buffers import CutPull, PushPlan, SessionBuffers, resumed_plan, worth_asking
from .compressing import CompressionPolicy
from .link import Answers, Link, OutputCallback, ProgressCallback
from .notebook_files import NotebookFolder, fetching, serve_fetch
from .progress import OUTGOING, Throttle, TransferProgress, both
from .results import ExecuteResult, NoticeCallback, QueueCallback, notify, parent_of, write_streams
from .variables import Dumped, dump, next_have, pull_request, push_request, take_pull, take_push
from .versions import mismatch

__all__ = ["AsyncSession", "ExecuteResult", "NoticeCallback", "OutputCallback", "ProgressCallback",
           "QueueCallback", "notify", "parent_of", "write_streams"]

class AsyncSession:
    """A leased GPU (or CPU slot) with its remote namespace.

    Requests run one at a time on the server, in the order they were sent.
    Call :meth:`release` when done; :meth:`close` only drops the connection
    (the server keeps the session for its grace period, and
    ``client.session(resume=session.id)`` gets it back).
    """

    def __init__(self, link: Link, granted: m.LeaseGranted, on_notice: NoticeCallback | None) -> None:
        self.id = granted.session
        self.slots = list(granted.slots)
        self.resumed = granted.resumed
        self.waited = granted.waited
        self.language_info = dict(granted.language_info)
        #: The worker's versions of Python and the packages that cross most (see
        #: :mod:`remote_gpu_core.fingerprint`), and what differs from this Python's in one
        #: line or None (:func:`.versions.mismatch`; the lease notice shows it).
        self.fingerprint = dict(granted.fingerprint)
        self.mismatch = mismatch(self.fingerprint, link.environments)
        self.released: str | None = None
        #: Parked: its namespace is on disk on the server, no GPU held; the next request restores it.
        self.parked = granted.parked
        #: What the latest park saved (None when it was parked before this client came).
        self.park_info: m.Parked | None = None
        self.on_notice = on_notice
        #: The journal sequence number of the last output this client saw;
        #: after a reconnect, ``replay(after=old.last_seq)`` gets the rest.
        self.last_seq = 0
        #: Gets what the worker publishes outside this client's requests (a
        #: thread that prints after its cell ended, a widget a timer updates);
        #: ``Output.parent`` names the Jupyter request it belongs to. Default:
        #: streams go to the local stdout/stderr. Called on the event loop.
        self.on_background: OutputCallback | None = write_streams
        self.max_upload = int(link.limits.get("max_upload") or 0)  # bytes one upload may carry (0: any)
        #: Where a remote cell's missing files are sent from when it opens them
        #: (see :mod:`.notebook_files`); None: fetching is off.
        self.notebook_files: NotebookFolder | None = None
        #: What this session's worker and this client hold of what they moved
        #: (see :mod:`.buffers`); ``buffers.counts`` are the bytes moved and saved.
        self.buffers = SessionBuffers(int(link.limits.get("session_cache") or 0))
        self._asks = granted.resumed and bool(link.limits.get("resume"))  # what the worker holds (:mod:`.buffers`)
        self.cut_pulls: dict[str, CutPull] = {}  # what came of a pull cut short, by session (its client's)
        self.compression = CompressionPolicy.for_peer(link.ws.remote_address)  # see :mod:`.compressing`
        #: Told how each push, pull, upload and download goes (see :mod:`.progress`); None: not at all.
        self.on_progress: Callable[[TransferProgress], Any] | None = None
        self._link = link
        link.on_released = self._on_released
        link.on_parked = self._on_parked
        link.on_background = self._on_background

    def _on_background(self, msg: m.Output) -> None:
        self.last_seq = max(self.last_seq, msg.seq)
        if self.on_background is not None:
            self.on_background(msg)

    def _on_released(self, msg: m.Released) -> None:
        if msg.session == self.id:
            self.released = msg.reason

    def _on_parked(self, msg: m.Parked) -> None:
        if msg.session == self.id:
            self.parked, self.park_info = True, msg
            self.buffers.remote.clear()  # its worker, and what it held, are gone

    @property
    def user(self) -> str | None:
        """Who the server says the token is."""
        return self._link.user

    @property
    def connected(self) -> bool:
        return self._link.closed_reason is None

    @contextlib.asynccontextmanager
    async def _exchange(self, message_factory: Callable[[int], m.Message], *, sending: ProgressCallback | None = None,
                        receiving: ProgressCallback | None = None, meter: str = "", had: int = 0,
                        ) -> AsyncIterator[Answers]:
        """Send a request (made from its id); yield what awaits its next answer (called) and
        names its id (``.req``). An :class:`Error` answer raises; the inbox is dropped on exit.

        ``sending`` and ``receiving`` hear the bytes of the request sent and of its answer received;
        ``meter`` (``push``, ``upload``: the request's; ``pull``, ``download``: the answer's) reports
        them to :attr:`on_progress` too, after the ``had`` bytes the other end held already. The request
        is sent on entry, its answers are not waited for: requests one after another are a pipeline.
        """
        if self.released:
            raise SessionReleased(f"this GPU session was released ({self.released})", code="released")
        req, inbox = self._link.open()
        throttle = Throttle(req, meter, self.on_progress, had=had) if meter and self.on_progress else None
        sending, receiving = ((both(sending, throttle), receiving) if meter in OUTGOING
                              else (sending, both(receiving, throttle)))
        if receiving is not None:
            self._link.progress[req] = receiving
        try:
            await self._link.send(message_factory(req), sending)
            yield Answers(req, lambda: self._link.receive(inbox), throttle)
        finally:
            if throttle is not None:
                throttle.stop()  # a transfer that did not finish says where it stopped
            self._link.progress.pop(req, None)
            self._link.done(req)

    async def _expect(self, receive: Callable[[], Awaitable[m.Message]],
                      *kinds: type[m.Message], on_notice: NoticeCallback | None = None,
                      on_queue: QueueCallback | None = None) -> m.Message:
        """The next answer of one of ``kinds``; notices on the way are shown
        (through ``on_notice`` if given), queue positions go to ``on_queue``."""
        while True:
            msg = await receive()
            if isinstance(msg, m.Notice):
                notify(on_notice or self.on_notice, msg.text)
            elif isinstance(msg, kinds):
                return msg
            elif isinstance(msg, m.LeaseGranted):
                self._granted(msg)
            elif isinstance(msg, m.QueuePosition) and on_queue is not None:
                on_queue(msg.position)

    def _granted(self, msg: m.LeaseGranted) -> None:
        """A parked session was restored on the way (its request's own answer follows)."""
        self.slots = list(msg.slots)
        self.language_info = dict(msg.language_info) or self.language_info
        self.fingerprint = dict(msg.fingerprint) or self.fingerprint
        self.mismatch = mismatch(self.fingerprint, self._link.environments)
        self.parked = msg.parked

    async def execute(self, code: str, on_output: OutputCallback | None = None, *,
                      timeout: float | None = None, silent: bool = False,
                      store_history: bool = True, allow_stdin: bool = False,
                      on_notice: NoticeCallback | None = None, on_queue: QueueCallback | None = None,
                      parent: dict[str, Any] | None = None, execution_count: int = 0,
                      on_fetched: NoticeCallback | None = None) -> ExecuteResult:
        """Run ``code`` remotely.

        ``on_output`` is called with every output message as it arrives; by
        default stream text goes to the local stdout/stderr. A parked
        session is restored first: ``on_queue(position)`` hears its place in
        the queue while it waits for a GPU, and a notice says what came back.
        ``parent`` is the Jupyter request header this cell answers (a
        kernel's or a magic's): the remote request runs under its ``msg_id``,
        so output that a frontend routes by id (``ipywidgets.Output``) finds
        its way. The server refuses a ``msg_id`` already running on the worker.
        ``execution_count`` (not 0): the cell's number in the notebook, which
        the remote IPython then uses too (see :class:`~.protocol.messages.Execute`).
        A file the cell opens that its session's folder lacks is sent from
        :attr:`notebook_files`; ``on_fetched`` hears one line for each
        (default: as a notice).
        """
        header = parent_of(parent)
        async with self._exchange(
                lambda r: m.Execute(r, code, timeout, silent, store_history, allow_stdin, header,
                                    execution_count, **fetching(self.notebook_files))) as receive:
            return await self._cell(receive, on_output, on_notice, on_queue, on_fetched)

    async def run(self, code: str, on_output: OutputCallback | None = None, *,
                  push: Mapping[str, Any] | None = None, pull: Iterable[str] = (),
                  timeout: float | None = None, silent: bool = False,
                  store_history: bool = True, allow_stdin: bool = False,
                  on_notice: NoticeCallback | None = None,
                  on_queue: QueueCallback | None = None,
                  parent: dict[str, Any] | None = None, execution_count: int = 0,
                  on_fetched: NoticeCallback | None = None) -> ExecuteResult:
        """Set the variables ``push``, run ``code``, and get the variables named
        in ``pull`` back in :attr:`ExecuteResult.values`: one round trip.

        The push, the cell and the pull go out back to back, before any
        answer; the server runs the cell only if the push succeeded, and
        pulls only if the cell did (see :class:`~.protocol.messages.Execute`).
        So the errors mean what :meth:`push`, :meth:`execute` and
        :meth:`pull` one after another would say: a value that cannot be
        pickled raises SerializationError before anything is sent; a push
        the server refuses raises, and the cell did not run; a cell that
        raises returns its error, with no values; a name the cell did not
        define raises NameError (a RemoteError) after the cell's output. An
        interrupt while the push is on its way stops the cell before it
        begins (status ``aborted``).
        The other arguments are :meth:`execute`'s.
        """
        names = list(pull)
        dumped = dump(push) if push else None
        plan = (await self._held(self.buffers.plan_push(dumped.buffers), dumped.buffers)
                if dumped is not None else None)
        have, cut = (self.buffers.have(), self.cut_pulls.pop(self.id, None)) if names else ([], None)
        header = parent_of(parent)
        missed = False
        async with contextlib.AsyncExitStack() as answers:
            pushing, wire, started = None, 0, time.monotonic()
            if dumped is not None and plan is not None:
                make, wire = push_request(self.compression, dumped, plan)
                pushing = await answers.enter_async_context(self._exchange(make, meter="push", had=sum(plan.offsets)))
            cell = await answers.enter_async_context(self._exchange(
                lambda r: m.Execute(r, code, timeout, silent, store_history, allow_stdin, header,
                                    execution_count, **fetching(self.notebook_files),
                                    after=pushing.req if pushing else 0)))
            pulling = None
            if names:
                pulling = await answers.enter_async_context(
                    self._exchange(pull_request(self.compression, names, have, after=cell.req, cut=cut), meter="pull"))
            if pushing is not None and dumped is not None and plan is not None:
                done = await self._expect(pushing, m.PushDone, on_notice=on_notice, on_queue=on_queue)
                assert isinstance(done, m.PushDone)
                pushing.finished()
                self.parked = False
                # Where it set nothing, the cell and the pull behind it do not run.
                missed = not take_push(self.buffers, self.compression, plan, dumped.buffers, done, wire,
                                       time.monotonic() - started)
            if not missed:
                try:
                    result = await self._cell(cell, on_output, on_notice, on_queue, on_fetched)
                except ServerError as exc:
                    if exc.code != m.ErrorCode.NOT_RUN.value:
                        raise
                    # Interrupted while its inputs were still on their way: it never began.
                    return ExecuteResult("aborted", 0, None, [])
                if pulling is None or not result.ok:
                    return result
                pull_started = time.monotonic()
                reply = await self._expect(pulling, m.PullReply, on_notice=on_notice)
                assert isinstance(reply, m.PullReply)
                pulling.finished()
                values, gone = take_pull(self.buffers, self.compression, reply, time.monotonic() - pull_started, cut)
        if missed:
            # The worker no longer held a buffer the push named: push the usual way (with the
            # bytes where needed), then the cell and its pull.
            assert dumped is not None and plan is not None
            await self._push(dumped, self.buffers.plan_push(dumped.buffers, plan.digests, trust_remote=True), tried=1)
            return await self.run(code, on_output, pull=names, timeout=timeout, silent=silent,
                                  store_history=store_history, allow_stdin=allow_stdin, on_notice=on_notice,
                                  on_queue=on_queue, parent=parent, execution_count=execution_count,
                                  on_fetched=on_fetched)
        result.values = values if values is not None else await self._pull(names, next_have(have, gone))
        return result

    async def _cell(self, receive: Callable[[], Awaitable[m.Message]], on_output: OutputCallback | None,
                    on_notice: NoticeCallback | None, on_queue: QueueCallback | None,
                    on_fetched: NoticeCallback | None) -> ExecuteResult:
        """The answers of an :class:`~m.Execute`, up to its ExecuteDone (see :meth:`execute`)."""
        handler = on_output if on_output is not None else write_streams
        outputs: list[m.Output] = []
        while True:
            msg = await receive()
            if isinstance(msg, m.Output):
                outputs.append(msg)
                self.last_seq = max(self.last_seq, msg.seq)
                handler(msg)
            elif isinstance(msg, m.Notice):
                notify(on_notice or self.on_notice, msg.text)
            elif isinstance(msg, m.Fetch):
                await serve_fetch(self._link, self.notebook_files, self.max_upload, msg,
                                  on_fetched or on_notice or self.on_notice)
            elif isinstance(msg, m.QueuePosition):
                if on_queue is not None:
                    on_queue(msg.position)
            elif isinstance(msg, m.LeaseGranted):
                self._granted(msg)
            elif isinstance(msg, m.ExecuteDone):
                self.parked = False
                error = None
                if msg.status == "error":
                    error = RemoteError.from_remote(msg.ename, msg.evalue, msg.traceback)
                return ExecuteResult(msg.status, msg.job, msg.execution_count, outputs, error)

    async def replay(self, after: int) -> list[m.Output]:
        """The outputs the session produced after sequence number ``after``.

        For a client that reconnected (``resume=``): what a cell printed
        while it was away, read from the server's journal. A cell still
        running from before the reconnect is waited for, so the answer holds
        all of its output.
        """
        outputs: list[m.Output] = []
        async with self._exchange(lambda r: m.Replay(r, after)) as receive:
            while True:
                msg = await self._expect(receive, m.Output, m.ReplayDone)
                if isinstance(msg, m.ReplayDone):
                    self.last_seq = max(self.last_seq, msg.last)
                    return outputs
                assert isinstance(msg, m.Output)
                outputs.append(msg)

    async def send_input(self, value: str) -> None:
        await self._link.send(m.Input(0, value))

    async def push(self, **values: Any) -> None:
        """Set variables in the remote namespace.

        Each value is pickled first: if one cannot be, SerializationError
        names it and nothing is sent.
        """
        dumped = dump(values)
        await self._push(dumped, await self._held(self.buffers.plan_push(dumped.buffers), dumped.buffers))

    async def _held(self, plan: PushPlan, buffers: list[Any]) -> PushPlan:
        """``plan`` less what the worker holds of its large buffers, once resumed (see :mod:`.buffers`)."""
        asked = worth_asking(plan, buffers) if self._asks else []
        if not asked:
            return plan
        async with self._exchange(lambda r: m.Holding(r, [plan.digests[i] for i in asked])) as receive:
            held = await self._expect(receive, m.Held)
        assert isinstance(held, m.Held)
        return resumed_plan(plan, buffers, asked, held.sizes)

    async def _push(self, dumped: Dumped, plan: PushPlan, tried: int = 0) -> None:
        """Push ``plan``; where the worker no longer holds a buffer it names, again
        with the bytes (the third try names nothing: it cannot miss)."""
        for attempt in range(tried, 3):
            make, wire = push_request(self.compression, dumped, plan)
            started = time.monotonic()
            async with self._exchange(make, meter="push", had=sum(plan.offsets)) as receive:
                done = await self._expect(receive, m.PushDone)
                receive.finished()
            assert isinstance(done, m.PushDone)
            if take_push(self.buffers, self.compression, plan, dumped.buffers, done, wire, time.monotonic() - started):
                break
            plan = self.buffers.plan_push(dumped.buffers, plan.digests, trust_remote=attempt == 0)
        self.parked = False

    async def pull(self, *names: str) -> dict[str, Any]:
        """Values of remote variables; a CUDA tensor arrives as a CPU tensor."""
        return await self._pull(list(names), self.buffers.have())

    async def _pull(self, names: list[str], have: list[str]) -> dict[str, Any]:
        for _ in range(3):  # the last offers nothing: it cannot miss
            started, cut = time.monotonic(), self.cut_pulls.pop(self.id, None)
            async with self._exchange(pull_request(self.compression, names, have, cut=cut), meter="pull") as receive:
                reply = await self._expect(receive, m.PullReply)
                receive.finished()
            assert isinstance(reply, m.PullReply)
            self.parked = False
            values, gone = take_pull(self.buffers, self.compression, reply, time.monotonic() - started, cut)
            if values is not None:
                return values
            have = next_have(have, gone)  # changed here since: ask for their bytes
        raise ProtocolError("the worker named buffers this client does not hold, although it was told")

    async def shell_request(self, msg_type: str, content: dict[str, Any], *, buffers: tuple[Any, ...] = (),
                            on_output: OutputCallback | None = None,
                            parent: dict[str, Any] | None = None) -> m.ShellReply:
        """Send a Jupyter shell request (complete, inspect, comm_msg, ...); return its reply.

        ``on_output`` gets the output messages the worker publishes while it
        handles the request (a widget's comm echo, a callback's prints);
        without it they are dropped. Comm messages have no Jupyter reply:
        theirs is an empty :class:`ShellReply` once the worker is idle; one
        for a comm the worker does not have raises ServerError with code
        ``no_comm`` and a message that says why. ``parent``: as in
        :meth:`execute`.
        """
        header = parent_of(parent)
        async with self._exchange(lambda r: m.ShellRequest(r, msg_type, content, tuple(buffers), header)) as receive:
            while True:
                reply = await self._expect(receive, m.ShellReply, m.Output)
                if isinstance(reply, m.ShellReply):
                    return reply
                if on_output is not None:
                    assert isinstance(reply, m.Output)
                    on_output(reply)

    async def park(self) -> m.Parked:
        """Save the remote namespace to disk on the GPU server and give the GPU back.

        The session stays; the next request (or :meth:`resume`) waits for a
        GPU and restores the namespace. Returns what was saved (``text`` says
        it in one line); raises ParkError if it could not be parked (a
        quota): the session then goes on as it was.
        """
        async with self._exchange(m.Park) as receive:
            parked = await self._expect(receive, m.Parked)
        assert isinstance(parked, m.Parked)
        self.parked, self.park_info = True, parked
        return parked

    async def resume(self, on_queue: QueueCallback | None = None, on_notice: NoticeCallback | None = None) -> None:
        """Restore a parked session now: wait for a GPU (``on_queue(position)``
        while in the queue), then load its namespace; a notice says what came
        back. Nothing happens to a session that is not parked."""
        async with self._exchange(m.Resume) as receive:
            while True:
                msg = await receive()
                if isinstance(msg, m.QueuePosition):
                    if on_queue is not None:
                        on_queue(msg.position)
                elif isinstance(msg, m.Notice):
                    notify(on_notice or self.on_notice, msg.text)
                elif isinstance(msg, m.LeaseGranted):
                    self._granted(msg)
                    return

    async def upload(self, *paths: str | os.PathLike[str],
                     on_progress: ProgressCallback | None = None) -> list[tuple[str, int]]:
        """Send local files (or folders) into the session's folder on the server.

        Returns ``(remote path, size)`` for each file: a relative path keeps
        its place (``images/x.png``), others keep their last part (see
        :mod:`remote_gpu_kernel.files`). A missing file, or more bytes than
        the server's limit, raises FileTransferError before anything is
        sent. ``on_progress(done, total)`` is called as the bytes go out.
        """
        files = _files.plan_upload(paths, self.max_upload)
        buffers = _files.read_files(files)
        try:
            async with self._exchange(lambda r: m.Upload(r, [f.remote for f in files], tuple(buffers)),
                                      sending=on_progress, meter="upload") as receive:
                done = await self._expect(receive, m.UploadDone)
                receive.finished()
        finally:
            _files.close_all(buffers)
        assert isinstance(done, m.UploadDone)
        return list(zip(done.paths, done.sizes))

    async def download(self, *paths: str, into: str | os.PathLike[str] | None = None,
                       on_progress: ProgressCallback | None = None) -> list[tuple[str, int]]:
        """Fetch files (or folders) from the session's folder into ``into``
        (default: the working folder), by the same relative paths.

        Returns ``(local path, size)`` for each file. A path outside the
        session's folder or missing there raises FileTransferError.
        """
        if not paths:
            raise FileTransferError("download: name at least one file or folder")
        async with self._exchange(lambda r: m.Download(r, [str(p) for p in paths]),
                                  receiving=on_progress, meter="download") as receive:
            reply = await self._expect(receive, m.DownloadReply)
            receive.finished()
        assert isinstance(reply, m.DownloadReply)
        written = _files.write_files(reply.paths, reply.buffers, None if into is None else Path(into))
        return [(str(path), size) for path, size in written]

    async def interrupt(self) -> None:
        """Interrupt the running cell (SIGINT to the worker), or stop waiting for a
        GPU to restore a parked session.

        A cell still running a few seconds later is said to ignore interrupts
        (a notice); interrupting it again then restarts the worker: the cell
        fails with :class:`WorkerDied` and the session's variables are gone.
        """
        await self._link.send(m.Interrupt(0))

    async def restart(self) -> None:
        """Restart the worker now: a running cell is stopped (SIGTERM to every
        process it started, SIGKILL after the server's grace) and the
        session's variables are gone; the next request waits for the fresh
        worker."""
        await self._link.send(m.Interrupt(0, restart=True))
        self.buffers.remote.clear()  # the fresh worker holds nothing

    async def release(self) -> None:
        """Give the GPU back; the worker and its variables are gone."""
        self.cut_pulls.pop(self.id, None)
        if self.released is None and self.connected:
            try:
                async with self._exchange(m.Release) as receive:
                    await self._expect(receive, m.Released)
            except (ConnectionLost, RemoteGpuError):
                pass
            self.released = self.released or "released by the client"
        await self._link.close()

    async def close(self) -> None:
        """Drop the connection but keep the lease for the server's grace period."""
        await self._link.close()
