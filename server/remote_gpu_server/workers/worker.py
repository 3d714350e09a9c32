"""The server's handle on one worker: a real ipykernel process, wherever it runs.

A :class:`Worker` is started from a :class:`~.launcher.WorkerLauncher`
(which owns the process: start, poll, signal, kill) and talks to the kernel
over its signed Jupyter channels with jupyter_client (their messages read
by :class:`~.fast_session.FastSession`); what it asks of the worker's own
extension (pushes, pulls, parking) goes over its
:class:`~.transfer_comm.TransferComm`, whose bytes move through the
process's :class:`~.datachannel.DataChannel`.

Every request completes when both its shell reply and its IOPub ``idle``
status have arrived, so no output is lost after the reply; what the kernel
publishes under a request after its idle is no longer that request's. If the process
dies, every pending request fails at once with :class:`WorkerDied` saying
how it ended. A request may be sent under a Jupyter ``msg_id`` its client
chose (the frontend's own, so that output routes by it); one already in
flight is refused with :class:`DuplicateRequest`. What the worker publishes
under no pending request goes to :attr:`Worker.on_unrouted`, and the comms
it opens and closes are kept in :attr:`Worker.comms`.

A new lease's worker takes on its user's identity (:meth:`Worker.enter`)
while the lease is answered (``later=True``): every request waits at
:meth:`Worker.request` until it has, so nothing of the user's reaches it
before, and one that could not fails the requests as a death does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import itertools
import logging
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, cast

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from remote_gpu_core.errors import ServerError, WorkerDied
from remote_gpu_core.fingerprint import FINGERPRINT_KEY, from_wire
from remote_gpu_core.protocol import messages as m

from . import death
from .comms import CommTable
from .fast_session import FastSession
from ..environments import DEFAULT_ENVIRONMENT
from ..errors import IsolationError
from ..gpus.discovery import Slot
from ..isolation.tenant import Tenant
from .launcher import WorkerLauncher, WorkerProcess, WorkerSpec
from ..worker_process.kernel import COUNT_KEY
from .transfer_comm import TransferComm

__all__ = ["DuplicateRequest", "GpuErrors", "IopubHandler", "Worker"]

log = logging.getLogger("remote_gpu_server")
#: True in the task that makes a worker its user's: its own requests pass :meth:`Worker.request`'s wait.
_ENTERING: contextvars.ContextVar[bool] = contextvars.ContextVar("rgpu_entering", default=False)

IopubHandler = Callable[[dict[str, Any]], Awaitable[None]]

#: What the GPUs of ``slots`` reported since a time (``time.monotonic()``): a
#: clause like "the GPU reported Xid 79 (...)", or None (see :mod:`.xid`).
GpuErrors = Callable[[Sequence[Slot], float], "str | None"]

_names = itertools.count(1)
#: How often a worker's process is polled for an unexpected exit.
DEATH_POLL_SECONDS = 0.2
#: How many of a worker's cells it remembers, to name the line a fatal signal hit.
CELLS_REMEMBERED = 200


class DuplicateRequest(ServerError, ValueError):
    """A request's Jupyter ``msg_id`` is already in flight on this worker: the
    client's request is refused (``bad_request``); the one in flight goes on."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=m.ErrorCode.BAD_REQUEST.value)


#: The longest Jupyter msg_id a client may choose for its request.
MAX_MSG_ID = 200


#: Messages published under no pending request that nobody needs: the
#: server's own requests' statuses, and the echo of a finished cell's code.
_NOT_UNROUTED = frozenset({"status", "execute_input"})


class _Pending:
    def __init__(self, on_iopub: IopubHandler | None) -> None:
        loop = asyncio.get_running_loop()
        self.on_iopub = on_iopub
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.idle: asyncio.Future[None] = loop.create_future()

    def fail(self, exc: BaseException) -> None:
        for fut in (self.reply, self.idle):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: one of them may never be awaited


class Worker:
    """One kernel process serving one session; see the module docstring.

    Make it with :meth:`start`, then send requests; call :meth:`kill` at the
    end (the launcher's stop ladder ends the process and everything it
    started: SIGTERM, ``term_grace`` seconds, SIGKILL).
    """

    def __init__(self, process: WorkerProcess, slots: list[Slot], *, term_grace: float = 0.0,
                 gpu_errors: GpuErrors | None = None) -> None:
        self.process = process
        self.slots = list(slots)
        self.name = process.name
        self.term_grace = term_grace
        self.gpu_errors = gpu_errors
        self.started_at = time.monotonic()
        #: The environment it runs (see :mod:`..environments`).
        self.environment = DEFAULT_ENVIRONMENT
        self.language_info: dict[str, Any] = {}
        #: Its versions of Python and of the packages that cross most, as it
        #: said when it started (see :mod:`remote_gpu_core.fingerprint`).
        self.fingerprint: dict[str, str] = {}
        #: How it ended, in one line (see :mod:`.death`), once it died.
        self.exit_description: str | None = None
        #: The pids the stop ladder found when it was killed (for the drain check).
        self.stopped_pids: frozenset[int] = frozenset()
        #: ``(execution count, code)`` of the cells it ran, the latest last.
        self.cells: collections.deque[tuple[int | None, str]] = collections.deque(maxlen=CELLS_REMEMBERED)
        self._kc: Any = None
        self._pending: dict[str, _Pending] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: The server's own comm on it: pushes, pulls, parking (see :mod:`.transfer_comm`).
        self.transfers = TransferComm(self, process.data)
        self._killed = False
        self._explained = False  # its launcher said how it ended (out of host memory)
        self.died = asyncio.Event()
        #: The comms open on this worker, as seen on its IOPub and shell traffic.
        self.comms = CommTable()
        #: Called with each output message published under no pending request.
        self.on_unrouted: IopubHandler | None = None
        #: Its taking on of a lease's identity, while it runs or once it failed (see :meth:`enter`).
        self.entering: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, launcher: WorkerLauncher, slots: list[Slot], startup_timeout: float = 120,
                    tenant: Tenant | None = None, *, term_grace: float = 0.0,
                    gpu_errors: GpuErrors | None = None, environment: str = DEFAULT_ENVIRONMENT) -> Worker:
        """Launch a worker on ``slots`` and wait until it answers; raises WorkerDied if it cannot.

        ``environment``: the interpreter it runs (see :mod:`..environments`).
        ``tenant``: the lease it continues (a replacement keeps its user and folder).
        ``term_grace``: seconds between SIGTERM and SIGKILL when it is killed;
        ``gpu_errors``: what its GPUs reported while it ran, for its cause of death.
        """
        name = f"w{next(_names)}-{'+'.join(s.id for s in slots)}".replace("/", "-")
        try:
            process = await launcher.launch(WorkerSpec(name, tuple(slots), startup_timeout, tenant, environment))
        except Exception as exc:
            raise WorkerDied(f"worker {name} failed to start: {exc}", code="worker_died") from exc
        worker = cls(process, slots, term_grace=term_grace, gpu_errors=gpu_errors)
        worker.environment = environment
        try:
            await worker._connect(startup_timeout)
        except BaseException:
            await worker.kill()
            raise
        return worker

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def node(self) -> str:
        return self.process.node

    @property
    def tenant(self) -> Tenant | None:
        """The user and session folder of the lease this worker serves, once leased."""
        return self.process.tenant

    async def enter(self, user: str, later: bool = False) -> None:
        """Make this started worker ``user``'s, before any of their requests.

        The worker takes on the lease's identity and session folder (see
        :mod:`.confinement`); raises IsolationError if it could not, and the
        worker must then be killed, never handed out. ``later``: the lease's
        folder is made now, and the worker takes it on in :attr:`entering`,
        for which every request waits (see the module docstring).
        """
        started = time.perf_counter()
        spec = self.process.enter_spec(user)
        if inspect.isawaitable(spec):  # asked of the worker's node (Ray)
            spec = await spec
        if spec is None:
            return
        if later:
            context = contextvars.copy_context()
            context.run(_ENTERING.set, True)
            self.entering = asyncio.get_running_loop().create_task(self._take_on(user, spec, started),
                                                                   context=context)
            return
        await self._take_on(user, spec, started)

    async def _take_on(self, user: str, spec: Any, started: float) -> None:
        reply = await self.transfers.op({"op": "enter", "spec": spec.to_json()})
        if not reply.get("ok"):
            raise IsolationError(f"worker {self.name} could not become {user}'s: "
                                 f"{reply.get('ename')}: {reply.get('evalue')}")
        if reply.get("site_problem"):
            log.warning("worker %s, %s's lease: %s", self.name, user, reply["site_problem"])
        log.debug("worker %s entered %s's lease in %s (%.1f ms)", self.name, user, spec.cwd,
                  (time.perf_counter() - started) * 1000)

    async def park(self, folder: str, limit: int | None) -> dict[str, Any]:
        """Save the namespace into ``folder`` (at most ``limit`` bytes); returns the
        worker's reply: ``ok`` with ``names``, ``unsaved``, ``nbytes``, ``seconds``,
        or ``ok: false`` with ``ename`` and ``evalue`` (nothing is left in ``folder``)."""
        return await self.transfers.op({"op": "park", "folder": folder, "limit": limit})

    async def restore(self, folder: str) -> dict[str, Any]:
        """Load what :meth:`park` saved in ``folder`` into this worker, then delete it;
        returns the reply: ``ok`` with ``names``, ``failed``, ``unsaved``, ``notes``,
        ``nbytes``, ``seconds``, or ``ok: false`` with ``ename`` and ``evalue``."""
        return await self.transfers.op({"op": "restore", "folder": folder})

    @property
    def lost_node(self) -> bool:
        """It died because its node went away (its slots went with it)."""
        return bool(getattr(self.process, "node_lost", False))

    @property
    def alive(self) -> bool:
        return self._kc is not None and not self.died.is_set() and not self._killed

    async def _connect(self, startup_timeout: float) -> None:
        info = self.process.connection_info
        # A worker on another host has CurveZMQ keys in its connection info,
        # and jupyter_client then encrypts every channel.
        kc = AsyncKernelClient(session=FastSession(key=_key(info),
                                                    signature_scheme=info.get("signature_scheme", "hmac-sha256")))
        kc.load_connection_info(cast(KernelConnectionInfo, info))
        kc.start_channels(hb=False)
        self._kc = kc
        try:
            await kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError as exc:
            raise WorkerDied(f"worker {self.name} failed to start: {exc}", code="worker_died") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(kc.iopub_channel, self._on_iopub)),
            loop.create_task(self._read(kc.shell_channel, self._on_shell)),
            loop.create_task(self._read(kc.stdin_channel, self._on_stdin)),
            loop.create_task(self._watch()),
        ]
        info_reply = await self.request("kernel_info_request", {})
        self.language_info = dict(info_reply["content"].get("language_info") or {})
        self.fingerprint = from_wire(info_reply["content"].get(FINGERPRINT_KEY))
        self.comms.reserved = f"rgpu-{self.name}"
        await self.transfers.open(self.comms.reserved)
        log.debug("worker %s ready on %s (pid %s)", self.name, self.node, self.pid)

    # -- reading ------------------------------------------------------------

    async def _read(self, channel: Any, handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        session = self._kc.session
        while True:
            try:
                # A receive, not jupyter_client's poll-then-receive: a poll that
                # waits while a request is sent on the same socket can miss the
                # message that arrives meanwhile (its edge is taken by the send).
                frames = await channel.socket.recv_multipart(copy=False)
                _, frames = session.feed_identities(frames, copy=False)
                msg = session.deserialize(frames, copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # closed socket after a kill
                if not self.alive:
                    return
                log.exception("worker %s: unreadable message", self.name)
                continue
            try:
                await handle(msg)
            except Exception:
                log.exception("worker %s: error handling %s", self.name, msg.get("msg_type"))

    async def _on_iopub(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        msg_type = msg["msg_type"]
        content = msg["content"]
        if msg_type == "comm_msg" and content.get("comm_id") == self.transfers.comm_id:
            self.transfers.answer(content["data"])
            return
        self.comms.published(msg_type, content)
        pending = self._pending.get(parent) if parent else None
        if pending is not None and pending.idle.done():
            # Published after the request's idle (an asyncio task its cell
            # left), before the request's coroutine took it off the table:
            # not its output, as a frontend of ipykernel would not take it.
            pending = None
        if pending is None:
            if self.on_unrouted is not None and msg_type not in _NOT_UNROUTED:
                await self.on_unrouted(msg)
            return
        if msg_type == "status":
            if content.get("execution_state") == "idle" and not pending.idle.done():
                pending.idle.set_result(None)
            return
        if pending.on_iopub is not None:
            await pending.on_iopub(msg)

    async def _on_shell(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        pending = self._pending.get(parent) if parent else None
        if pending is not None and not pending.reply.done():
            pending.reply.set_result(msg)

    async def _on_stdin(self, msg: dict[str, Any]) -> None:
        parent = (msg.get("parent_header") or {}).get("msg_id")
        pending = self._pending.get(parent) if parent else None
        if pending is not None and pending.on_iopub is not None:
            await pending.on_iopub(msg)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(DEATH_POLL_SECONDS)
            if self._killed:
                return
            code = await self.process.poll()
            if code is not None:
                self._explained = self.process.death_cause is not None
                self.exit_description = self.describe_death(code)
                log.warning("worker %s on %s died: %s", self.name, self.node, self.exit_description)
                self._fail_all(WorkerDied(self.death_message(), code="worker_died"))
                self.died.set()
                return

    def describe_gpu_errors(self) -> str | None:
        """What its GPUs reported while it ran (an Xid error), or None."""
        return self.gpu_errors(self.slots, self.started_at) if self.gpu_errors is not None else None

    def describe_death(self, code: int | None) -> str:
        """How it ended (see :mod:`.death`), with what its GPUs reported meanwhile."""
        how = death.describe(code, explained=self.process.death_cause,
                             report=getattr(self.process, "fault_report", None), cells=list(self.cells))
        gpu = self.describe_gpu_errors()
        return f"{how}; {gpu}" if gpu else how

    def death_message(self) -> str:
        where = f" on {self.node}" if self.process.remote else ""
        after = ("This session ends: the next cell leases another GPU." if self.lost_node
                 else "The session gets a fresh worker for the next cell.")
        how = (f"was stopped: {self.exit_description}" if self._explained and not self.process.remote
               else f"died: {self.exit_description}")
        return f"the worker process{where} {how}. Its variables are gone. {after}"

    def _fail_all(self, exc: BaseException) -> None:
        for pending in self._pending.values():
            pending.fail(exc)

    # -- requests -----------------------------------------------------------

    def check_alive(self) -> None:
        """Raise :class:`WorkerDied` if the worker is dead or shut down."""
        if self.died.is_set():
            raise WorkerDied(self.death_message(), code="worker_died")
        if self._killed or self._kc is None:
            raise WorkerDied(f"worker {self.name} was shut down", code="worker_died")

    async def request(self, msg_type: str, content: dict[str, Any], on_iopub: IopubHandler | None = None,
                      buffers: list[Any] | None = None, msg_id: str | None = None,
                      metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a shell request; return the reply message once the kernel is idle.

        ``msg_id`` (a client's Jupyter request id) is the request's own id if
        given: raises :class:`DuplicateRequest` if one by that id is in
        flight, ValueError if it is not a short string. Comm messages have
        no shell reply: for them only the idle status is awaited and the
        returned message is empty.
        """
        await self.settled()
        self.check_alive()
        header = None
        if msg_id is not None:
            if not isinstance(msg_id, str) or not 0 < len(msg_id) <= MAX_MSG_ID:
                raise ValueError(f"a request's msg_id must be a string of 1 to {MAX_MSG_ID} characters")
            if msg_id in self._pending:
                raise DuplicateRequest(f"a request with msg_id {msg_id!r} is already running on this worker")
            header = self._kc.session.msg_header(msg_type)
            header["msg_id"] = msg_id
        msg = self._kc.session.msg(msg_type, content, header=header, metadata=metadata)
        msg_id = msg["header"]["msg_id"]
        pending = _Pending(on_iopub)
        self._pending[msg_id] = pending
        try:
            self._kc.session.send(self._kc.shell_channel.socket, msg, buffers=buffers)
            if msg_type in ("comm_open", "comm_msg", "comm_close"):  # no shell reply
                await pending.idle
                return {}
            reply = await pending.reply
            await pending.idle
            return dict(reply)
        finally:
            self._pending.pop(msg_id, None)

    async def execute(self, code: str, on_iopub: IopubHandler, *, silent: bool = False,
                      store_history: bool = True, allow_stdin: bool = False,
                      msg_id: str | None = None, execution_count: int | None = None) -> dict[str, Any]:
        """Run ``code``; ``on_iopub`` gets every output message; returns the reply.

        ``msg_id`` as in :meth:`request`. ``execution_count``: the number the
        kernel's IPython gives this cell (see :data:`.worker_kernel.COUNT_KEY`).
        """
        self.cells.append((None, code))  # a fatal signal in it is reported with its line
        reply = await self.request(
            "execute_request",
            {"code": code, "silent": silent, "store_history": store_history,
             "user_expressions": {}, "allow_stdin": allow_stdin, "stop_on_error": True},
            on_iopub, msg_id=msg_id,
            metadata={COUNT_KEY: int(execution_count)} if execution_count else None,
        )
        content = dict(reply["content"])
        if self.cells and self.cells[-1] == (None, code):
            self.cells[-1] = (content.get("execution_count"), code)
        return content

    async def push(self, names: list[str], counts: list[int], buffers: list[Any]) -> dict[str, Any]:
        """Set variables in the worker; returns its reply (``ok`` or an error).
        ``buffers`` may still be arriving: see :meth:`.TransferComm.send_buffers`."""
        return await self.transfers.send_buffers({"op": "push", "names": names, "counts": counts}, buffers)

    async def pull(self, names: list[str]) -> tuple[dict[str, Any], AsyncGenerator[Any, None] | None]:
        """Pickle variables in the worker: ``(reply, pieces)``, ``reply`` with
        ``names``, ``counts`` and ``sizes``; see :meth:`.TransferComm.receive_buffers`."""
        return await self.transfers.receive_buffers({"op": "pull", "names": names})

    def send_input(self, value: str) -> None:
        self.check_alive()
        self._kc.input(value)

    async def settled(self) -> None:
        """Once the worker may take a request: it became its lease's (see
        :meth:`enter`); WorkerDied if it could not become theirs."""
        if self.entering is None or _ENTERING.get():
            return
        try:
            await asyncio.shield(self.entering)
        except asyncio.CancelledError:
            if not self.entering.cancelled():
                raise  # this request was cancelled, not the entering
            raise WorkerDied(f"worker {self.name} was stopped before it became its lease's",
                             code="worker_died") from None
        except Exception as exc:
            raise WorkerDied(f"{exc}" if isinstance(exc, (IsolationError, WorkerDied)) else
                             f"worker {self.name} could not become its lease's: {exc}", code="worker_died") from None

    async def interrupt(self) -> None:
        with contextlib.suppress(WorkerDied):
            await self.settled()  # a signal must not land in the middle of its entering
        if self.alive:
            await self.process.signal(signal.SIGINT)

    async def kill(self, reason: str | None = None) -> None:
        """End the worker and everything it started, and clean up; safe to call twice.

        The launcher's stop ladder runs (SIGTERM to every process of the
        worker, SIGKILL after :attr:`term_grace`); the pids it found are kept
        in :attr:`stopped_pids`. Pending requests then fail with
        :class:`WorkerDied` saying ``reason`` (default: it was shut down).
        """
        if self._killed:
            return
        self._killed = True
        for task in self._tasks:
            task.cancel()
        try:
            self.stopped_pids = await self.process.terminate(self.term_grace)
        finally:
            if self._kc is not None:
                self._kc.stop_channels()
            self._fail_all(WorkerDied(reason or f"worker {self.name} was shut down", code="worker_died"))
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


def _key(info: dict[str, Any]) -> bytes:
    key = info.get("key", b"")
    return key.encode() if isinstance(key, str) else bytes(key)

