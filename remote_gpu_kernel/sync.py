"""The blocking client: the asyncio client driven from one I/O thread.

The magic runs inside a kernel whose event loop already runs on the main
thread, so nothing here calls ``asyncio.run``. One daemon thread owns an
event loop and every connection; the caller's thread waits on queues, runs
the output callbacks itself (so ``display()`` goes to the right cell), and
stays free to take a KeyboardInterrupt, which it turns into a remote
interrupt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from .buffers import TransferCounts
from .client import AsyncClient
from .notebook_files import NotebookFolder
from .progress import ProgressCallback as TransferCallback, TransferProgress, default_progress
from .session import (
    AsyncSession, ExecuteResult, NoticeCallback, OutputCallback, ProgressCallback, QueueCallback, notify,
    write_streams
)
from remote_gpu_core.login import ClientConfig
from remote_gpu_core.protocol import messages as m

__all__ = ["Client", "Session"]

T = TypeVar("T")

#: After this many KeyboardInterrupts, a blocking call stops waiting for its
#: cell (which may still run on the server: the next request waits for it).
GIVE_UP_AFTER = 3

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def io_loop() -> asyncio.AbstractEventLoop:
    """The process's I/O loop, started on first use in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="remote-gpu-io", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the I/O loop and wait for it from this thread."""
    return asyncio.run_coroutine_threadsafe(coro, io_loop()).result(timeout)


_DONE = object()


def _pump(coro_factory: Callable[[Callable[[Any], None]], Coroutine[Any, Any, T]],
          handle: Callable[[Any], None], on_interrupt: Callable[[], None] | None = None) -> T:
    """Run a coroutine that emits events; handle them in this thread.

    ``coro_factory`` gets a thread-safe ``emit``. On KeyboardInterrupt
    ``on_interrupt`` runs and the coroutine is waited for; the server decides
    what each interrupt does (the first interrupts the cell; after it said
    the cell ignores interrupts, the next restarts the worker), so the
    coroutine ends either way. The :data:`GIVE_UP_AFTER`-th KeyboardInterrupt
    stops waiting. If an interrupt came, KeyboardInterrupt is raised again
    at the end, unless the coroutine raised an error of its own.
    """
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    future = asyncio.run_coroutine_threadsafe(coro_factory(events.put), io_loop())
    future.add_done_callback(lambda _: events.put(_DONE))
    interrupts = 0
    try:
        while True:
            # The interrupt can land while an event is being shown (writing
            # output flushes, and a notebook's stop button comes right after
            # the output it saw) as well as while waiting for the next one.
            try:
                item = events.get()
                if item is _DONE:
                    break
                handle(item)
            except KeyboardInterrupt:
                interrupts += 1
                if on_interrupt is None or interrupts >= GIVE_UP_AFTER:
                    raise
                on_interrupt()
    except BaseException:
        future.cancel()  # nobody waits for it any more
        raise
    result = future.result()
    if interrupts:
        raise KeyboardInterrupt
    return result


def _bytes(emit: Callable[[Any], None], on_progress: ProgressCallback | None) -> ProgressCallback | None:
    """An async call's ``on_progress(done, total)`` that pumps the pairs to the
    caller's thread (see :meth:`Session._transfer`); None where nobody asked."""
    return None if on_progress is None else lambda done, total: emit((done, total))


class Client:
    """Blocking twin of :class:`~remote_gpu_kernel.AsyncClient` (same arguments)."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 open_timeout: float = 10, cafile: str | None = None,
                 insecure: bool | None = None) -> None:
        self._client = AsyncClient(url, token, open_timeout=open_timeout, cafile=cafile,
                                   insecure=insecure)

    @property
    def url(self) -> str:
        return self._client.url

    @property
    def config(self) -> ClientConfig:
        """Where the server is and how to reach it (URL, token, TLS settings)."""
        return self._client.config

    @property
    def user(self) -> str | None:
        return self._client.user

    def session(self, gpus: int | None = None, *, resume: str | None = None,
                priority: str | None = None, pool: str | None = None,
                on_queue: QueueCallback | None = None,
                on_notice: NoticeCallback | None = None,
                notebook: str | None = None, say_mismatch: bool = True, env: str | None = None) -> Session:
        """Lease ``gpus`` slots (a worker in environment ``env``); waits in the queue if none is free.

        ``on_queue(position)`` is called (in this thread) whenever the
        position changes. Use the session as a context manager to release it.
        ``say_mismatch``: as :meth:`AsyncClient.open_session` says.
        """
        def handle(event: tuple[str, Any]) -> None:
            kind, value = event
            if kind == "queue" and on_queue is not None:
                on_queue(value)
            elif kind == "notice":
                notify(on_notice, value)

        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, AsyncSession]:
            return self._client.open_session(
                gpus, resume=resume, priority=priority, pool=pool,
                on_queue=lambda p: emit(("queue", p)),
                on_notice=lambda t: emit(("notice", t)),
                notebook=notebook, say_mismatch=say_mismatch, env=env,
            )

        return Session(_pump(factory, handle), on_notice)


@dataclasses.dataclass(frozen=True)
class _Fetched:
    """A cell's line about a file fetched from the notebook's folder, on its way to the caller's thread."""

    text: str


class Session:
    """Blocking twin of :class:`~remote_gpu_kernel.AsyncSession`."""

    def __init__(self, session: AsyncSession, on_notice: NoticeCallback | None = None) -> None:
        self._session = session
        self.on_notice = on_notice
        # Notices that come with other answers than a cell's (a push after the
        # worker died, say) arrive on the I/O thread; they are shown here,
        # in the caller's thread, when the call returns.
        self._notices: queue.SimpleQueue[str] = queue.SimpleQueue()
        session.on_notice = self._notices.put
        #: Told, in the caller's thread, how each push and pull goes (see
        #: :mod:`.progress`): by default one line in the cell inside Jupyter, on
        #: stderr on a terminal, else nothing. None: quiet.
        self.on_progress: TransferCallback | None = default_progress()

    def _reporting(self, emit: Callable[[Any], None]) -> None:
        """Have this call's transfers reported through ``emit`` (to the caller's thread)."""
        self._session.on_progress = emit if self.on_progress is not None else None

    def _transfer(self, call: Callable[[Callable[[Any], None]], Coroutine[Any, Any, T]],
                  on_bytes: ProgressCallback | None = None) -> T:
        """Run a push, pull, upload or download (``call(emit)``); its progress
        events go to :attr:`on_progress` here, and the ``(done, total)`` pairs it
        emits to ``on_bytes``. A KeyboardInterrupt stops waiting at once (the
        transfer is cancelled): each transfer it left running is told here as
        stopped, since the I/O thread's word of it would come after the call."""
        running: dict[int, TransferProgress] = {}

        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, T]:
            self._reporting(emit)
            return call(emit)

        def handle(event: TransferProgress | tuple[int, int]) -> None:
            if isinstance(event, TransferProgress):
                if event.finished or event.stopped:
                    running.pop(event.req, None)
                else:
                    running[event.req] = event
                if self.on_progress is not None:
                    self.on_progress(event)
            elif on_bytes is not None:
                on_bytes(*event)

        try:
            return self._with_notices(lambda: _pump(factory, handle))
        except BaseException:
            for event in running.values():
                if self.on_progress is not None:
                    self.on_progress(dataclasses.replace(event, stopped=True))
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return run(coro)
        finally:
            self._show_notices()

    def _show_notices(self) -> None:
        while True:
            try:
                text = self._notices.get_nowait()
            except queue.Empty:
                break
            notify(self.on_notice, text)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def notebook_files(self) -> NotebookFolder | None:
        """Where a remote cell's missing files are fetched from; None: off
        (see :attr:`AsyncSession.notebook_files`)."""
        return self._session.notebook_files

    @notebook_files.setter
    def notebook_files(self, folder: NotebookFolder | None) -> None:
        self._session.notebook_files = folder

    @property
    def slots(self) -> list[str]:
        return self._session.slots

    @property
    def resumed(self) -> bool:
        return self._session.resumed

    @property
    def waited(self) -> float:
        """Seconds the lease request waited in the server's queue."""
        return self._session.waited

    @property
    def released(self) -> str | None:
        return self._session.released

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def parked(self) -> bool:
        """The session is parked (see :meth:`park`)."""
        return self._session.parked

    @property
    def park_info(self) -> m.Parked | None:
        return self._session.park_info

    @property
    def language_info(self) -> dict[str, Any]:
        return self._session.language_info

    @property
    def fingerprint(self) -> dict[str, str]:
        """The worker's versions (see :attr:`AsyncSession.fingerprint`)."""
        return self._session.fingerprint

    @property
    def mismatch(self) -> str | None:
        """What differs between the versions on both ends, in one line, or None."""
        return self._session.mismatch

    @property
    def max_upload(self) -> int:
        return self._session.max_upload

    @property
    def transfer_counts(self) -> TransferCounts:
        """Bytes of variables pushed and pulled, and those not sent again (see :mod:`.buffers`)."""
        return self._session.buffers.counts

    @property
    def on_background(self) -> OutputCallback | None:
        """See :attr:`AsyncSession.on_background`; called on the I/O thread."""
        return self._session.on_background

    @on_background.setter
    def on_background(self, callback: OutputCallback | None) -> None:
        self._session.on_background = callback

    def execute(self, code: str, on_output: OutputCallback | None = None, *,
                timeout: float | None = None, silent: bool = False,
                store_history: bool = True, allow_stdin: bool = False,
                on_queue: QueueCallback | None = None,
                parent: dict[str, Any] | None = None, execution_count: int = 0,
                on_fetched: NoticeCallback | None = None) -> ExecuteResult:
        """Run ``code``; see :meth:`AsyncSession.execute`.

        Callbacks run in this thread, as output arrives. A KeyboardInterrupt
        here interrupts the remote cell (or stops waiting for a GPU to
        restore a parked session), waits for it to stop, and is raised
        again; a second one, once the server said the cell ignores
        interrupts, restarts the worker (the cell then fails with
        WorkerDied).
        """
        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, ExecuteResult]:
            return self._session.execute(code, emit, timeout=timeout, silent=silent,
                                         store_history=store_history, allow_stdin=allow_stdin,
                                         on_notice=emit, on_queue=lambda p: emit(m.QueuePosition(0, p)),
                                         parent=parent, execution_count=execution_count,
                                         on_fetched=lambda text: emit(_Fetched(text)))

        return _pump(factory, self._cell_events(on_output, on_queue, on_fetched), self.interrupt)

    def run(self, code: str, on_output: OutputCallback | None = None, *,
            push: Mapping[str, Any] | None = None, pull: Iterable[str] = (),
            timeout: float | None = None, silent: bool = False,
            store_history: bool = True, allow_stdin: bool = False,
            on_queue: QueueCallback | None = None,
            parent: dict[str, Any] | None = None, execution_count: int = 0,
            on_fetched: NoticeCallback | None = None) -> ExecuteResult:
        """Push ``push``, run ``code``, pull ``pull`` into the result's ``values``,
        in one round trip; see :meth:`AsyncSession.run`. Callbacks and
        interrupts as in :meth:`execute`."""
        names = list(pull)

        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, ExecuteResult]:
            self._reporting(emit)
            return self._session.run(code, emit, push=push, pull=names, timeout=timeout, silent=silent,
                                     store_history=store_history, allow_stdin=allow_stdin,
                                     on_notice=emit, on_queue=lambda p: emit(m.QueuePosition(0, p)),
                                     parent=parent, execution_count=execution_count,
                                     on_fetched=lambda text: emit(_Fetched(text)))

        return _pump(factory, self._cell_events(on_output, on_queue, on_fetched), self.interrupt)

    def _cell_events(self, on_output: OutputCallback | None, on_queue: QueueCallback | None,
                     on_fetched: NoticeCallback | None) -> Callable[[Any], None]:
        """Handle a cell's pumped events in this thread: outputs, queue positions,
        files fetched from the notebook's folder, notices."""
        handler = on_output if on_output is not None else write_streams

        def handle(event: Any) -> None:
            if isinstance(event, m.Output):
                handler(event)
            elif isinstance(event, m.QueuePosition):
                if on_queue is not None:
                    on_queue(event.position)
            elif isinstance(event, _Fetched):
                notify(on_fetched or self.on_notice, event.text)
            elif isinstance(event, TransferProgress):
                if self.on_progress is not None:
                    self.on_progress(event)
            else:
                notify(self.on_notice, event)

        return handle

    @property
    def last_seq(self) -> int:
        return self._session.last_seq

    def replay(self, after: int) -> list[m.Output]:
        """See :meth:`AsyncSession.replay`."""
        return self._call(self._session.replay(after))

    def push(self, **values: Any) -> None:
        """See :meth:`AsyncSession.push`; a large one shows its progress (:attr:`on_progress`)."""
        self._transfer(lambda _: self._session.push(**values))

    def pull(self, *names: str) -> dict[str, Any]:
        """See :meth:`AsyncSession.pull`; a large one shows its progress (:attr:`on_progress`)."""
        return self._transfer(lambda _: self._session.pull(*names))

    def shell_request(self, msg_type: str, content: dict[str, Any], *,
                      buffers: tuple[Any, ...] = (), on_output: OutputCallback | None = None,
                      parent: dict[str, Any] | None = None) -> m.ShellReply:
        """See :meth:`AsyncSession.shell_request`; ``on_output`` runs in this thread."""
        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, m.ShellReply]:
            return self._session.shell_request(msg_type, content, buffers=buffers, on_output=emit,
                                               parent=parent)

        return self._with_notices(lambda: _pump(factory, on_output or (lambda _: None)))

    def upload(self, *paths: Any, on_progress: ProgressCallback | None = None) -> list[tuple[str, int]]:
        """See :meth:`AsyncSession.upload`; a large one shows its progress
        (:attr:`on_progress`), and ``on_progress(done, total)`` runs in this thread."""
        return self._transfer(lambda emit: self._session.upload(*paths, on_progress=_bytes(emit, on_progress)),
                              on_progress)

    def download(self, *paths: str, into: Any = None,
                 on_progress: ProgressCallback | None = None) -> list[tuple[str, int]]:
        """See :meth:`AsyncSession.download`; a large one shows its progress
        (:attr:`on_progress`), and ``on_progress(done, total)`` runs in this thread."""
        return self._transfer(lambda emit: self._session.download(*paths, into=into,
                                                                  on_progress=_bytes(emit, on_progress)),
                              on_progress)

    def _with_notices(self, call: Callable[[], T]) -> T:
        try:
            return call()
        finally:
            self._show_notices()

    def send_input(self, value: str) -> None:
        run(self._session.send_input(value))

    def interrupt(self) -> None:
        asyncio.run_coroutine_threadsafe(self._session.interrupt(), io_loop())

    def restart(self) -> None:
        """See :meth:`AsyncSession.restart`."""
        run(self._session.restart())

    def park(self) -> m.Parked:
        """See :meth:`AsyncSession.park`."""
        return self._call(self._session.park())

    def resume(self, on_queue: QueueCallback | None = None) -> None:
        """See :meth:`AsyncSession.resume`; ``on_queue`` and the notice run in this
        thread, and a KeyboardInterrupt stops the wait (the session stays parked)."""
        def handle(event: Any) -> None:
            if isinstance(event, m.QueuePosition):
                if on_queue is not None:
                    on_queue(event.position)
            else:
                notify(self.on_notice, event)

        def factory(emit: Callable[[Any], None]) -> Coroutine[Any, Any, None]:
            return self._session.resume(on_queue=lambda p: emit(m.QueuePosition(0, p)), on_notice=emit)

        _pump(factory, handle, self.interrupt)


    def release(self, timeout: float | None = None) -> None:
        """Give the GPU back; ``timeout``: stop waiting for the answer after that long."""
        try:
            run(self._session.release(), timeout)
        finally:
            self._show_notices()

    def close(self) -> None:
        run(self._session.close())
