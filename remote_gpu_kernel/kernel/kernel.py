"""The "Remote GPU" Jupyter kernel: every cell runs on a leased GPU.

Started by Jupyter as ``python -m remote_gpu_kernel.kernel -f CONNECTION``
(see :mod:`remote_gpu_kernel.kernelspec`), it speaks the Jupyter protocol
to the notebook and forwards each cell to a remote worker through
:class:`AsyncSession`, on the kernel's own asyncio loop. What the worker publishes (streams, displays,
results, errors, comm traffic, ``input_request``) is re-published on this
kernel's IOPub socket under the notebook's own request, so the notebook
cannot tell the difference from a local IPython kernel.

* The GPU is leased at the first cell that needs it (see
  :mod:`.lease`); the queue position is shown in place.
* Interrupts (SIGINT, which is how ipykernel delivers both
  ``interrupt_mode``\\ s) interrupt the remote cell, or withdraw a lease that
  still waits in the queue, or interrupt a ``%%local`` cell.
* Restart and shutdown release the lease; a restarted kernel leases anew.
* ``%%local`` cells and ``%gpu push/pull`` are described in
  :mod:`.cells` and :mod:`.local`; widgets' comm messages in :mod:`.comms`;
  a remote ``input()`` in :mod:`.stdin`.
* A dropped connection is reported in the running cell; the next cell
  reconnects to the same session.
* ``%gpu park`` saves the remote namespace on the server and gives the GPU
  back; the next cell (or ``%gpu resume``) waits for one and restores it.
  Completion and help for a parked session are answered locally, so that a
  Tab does not take a GPU.
* ``obj?`` and ``obj??`` show the remote object's help in the pager.
"""

from __future__ import annotations

import asyncio
import platform
import re
import signal
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from ipykernel.kernelbase import Kernel

from remote_gpu_core import __version__
from remote_gpu_core.errors import ConnectionLost, RemoteGpuError
from remote_gpu_core.ipykernel_app import CommsBesideCells, MainLoopKernelApp, MainLoopShell, skip_empty_flushes
from remote_gpu_core.protocol import messages as m

from .. import notices
from ..session import AsyncSession
from .cells import Cell, CellKind, CellSyntaxError, GpuCommand, parse_cell
from .comms import CommForwarder
from .history import History
from .lease import RemoteLease
from .local import LocalNamespace
from .output import AfterIdle, CellOutput, IOPub, Parents
from .stdin import FrontendInput

__all__ = ["LOCAL_LANGUAGE_INFO", "RemoteGpuKernel", "RemoteGpuKernelApp", "main"]

#: Shown until a lease says what the remote Python is.
LOCAL_LANGUAGE_INFO: dict[str, Any] = {
    "name": "python",
    "version": platform.python_version(),
    "mimetype": "text/x-python",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "pygments_lexer": "ipython3",
    "nbconvert_exporter": "python",
    "file_extension": ".py",
}

#: A help request cell: ``name?``, ``name??``, ``?name`` or ``??name``.
_HELP = re.compile(r"^\s*(?P<before>\?{1,2})?(?P<name>[A-Za-z_][\w.]*)(?P<after>\?{1,2})?\s*$")
#: How long shutdown waits for the lease to be given back.
RELEASE_TIMEOUT = 10.0


T = TypeVar("T")

class RemoteGpuKernel(MainLoopShell, CommsBesideCells, Kernel):
    """See the module docstring. Jupyter makes it through IPKernelApp."""

    implementation = "remote_gpu_kernel"
    implementation_version = __version__
    language_info = LOCAL_LANGUAGE_INFO
    banner = (f"Remote GPU kernel {__version__}: cells run on a GPU leased from a remote-gpu "
              "server at the first cell that needs one. %%local runs a cell here; "
              "%gpu push/pull NAME moves variables; %gpu status; %gpu release; %gpu park.")
    # ipykernel sleeps 0.5 ms before each execute_reply so that its stdout
    # streams flush; remote output is sent directly and %%local cells flush
    # their streams themselves, so the sleep only adds latency here.
    _execute_sleep = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call, unused-ignore]
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = self._comm_request
        session = self.session
        assert session is not None, "IPKernelApp gives its kernel a Jupyter session"
        self.iopub = IOPub(session, self.iopub_socket, self._topic)
        self.stdin = FrontendInput(session, self.stdin_socket)
        self.remote = RemoteLease(on_background=self._background)
        self.comms = CommForwarder(self.remote, self._session, self.log)
        self.parents = Parents()
        self.after_idle = AfterIdle()
        self.local = LocalNamespace(session, self.iopub_socket, self._topic)
        self.history = History()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A wait of this kernel's own that the stop button ends: a lease in the queue, a transfer.
        self._stoppable: asyncio.Future[Any] | None = None
        self._remote_running: AsyncSession | None = None
        self._local_running = False
        #: The notebook request of the cell that runs now, if one does.
        self._running_parent: dict[str, Any] | None = None

    # -- process ------------------------------------------------------------

    def start(self) -> None:
        super().start()  # type: ignore[no-untyped-call, unused-ignore]
        self._loop = asyncio.get_event_loop()
        signal.signal(signal.SIGINT, self._on_sigint)
        for stream in (sys.stdout, sys.stderr):
            skip_empty_flushes(stream)

    def pre_handler_hook(self) -> None:
        """SIGINT stays with :meth:`_on_sigint` (ipykernel would install its own)."""

    def post_handler_hook(self) -> None:
        """See :meth:`pre_handler_hook`."""

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._local_running:
            raise KeyboardInterrupt
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._interrupt)

    def _interrupt(self) -> None:
        if self._stoppable is not None and not self._stoppable.done():
            self._stoppable.cancel()
        elif self._remote_running is not None and self._loop is not None:
            self._loop.create_task(self._remote_running.interrupt())

    @property
    def kernel_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super().kernel_info
        info["language_info"] = self.remote.language_info or LOCAL_LANGUAGE_INFO
        info["supported_features"] = []
        return info

    # -- execute ------------------------------------------------------------

    async def do_execute(self, code: str, silent: bool, store_history: bool = True,
                         user_expressions: dict[str, Any] | None = None, allow_stdin: bool = False,
                         *, cell_meta: dict[str, Any] | None = None,
                         cell_id: str | None = None) -> dict[str, Any]:
        cell = self._cell(self.get_parent("shell"))  # type: ignore[no-untyped-call, unused-ignore]
        self.parents.remember(cell.parent)
        self.after_idle.begin(cell.parent)
        self._running_parent = cell.parent
        try:
            return await self._execute(cell, code, silent, store_history, allow_stdin)
        finally:
            self._running_parent = None

    async def _execute(self, cell: CellOutput, code: str, silent: bool, store_history: bool,
                       allow_stdin: bool) -> dict[str, Any]:
        if store_history and not silent:
            self.history.append(self.execution_count, code)
        try:
            parsed = parse_cell(code)
        except CellSyntaxError as exc:
            return cell.error("UsageError", str(exc))
        if parsed.kind is CellKind.LOCAL:
            return self._run_local(parsed, cell, silent, store_history)
        for command in parsed.commands:
            failed = await self._run_command(command, cell)
            if failed is not None:
                return failed
        help_request = _HELP.match(parsed.body) if not parsed.commands and not parsed.after else None
        if help_request is not None and (help_request.group("before") or help_request.group("after")):
            return await self._help(help_request, cell)
        if parsed.has_body:
            reply = await self._run_remote(parsed.body, cell, silent, store_history, allow_stdin)
            if reply["status"] != "ok":
                return reply
        for command in parsed.after:
            failed = await self._run_command(command, cell)
            if failed is not None:
                return failed
        return self._ok()

    async def _help(self, match: re.Match[str], cell: CellOutput) -> dict[str, Any]:
        """``obj?`` / ``obj??``: the remote object's help, as IPython's pager payload.

        The worker's execute reply carries the page as a payload that the
        protocol does not relay, so the kernel asks for it with an inspect
        request and builds the payload itself.
        """
        name = match.group("name")
        marks = match.group("before") or match.group("after") or "?"
        session = await self._session(cell)
        if isinstance(session, dict):
            return session
        try:
            reply = (await session.shell_request("inspect_request", {
                "code": name, "cursor_pos": len(name), "detail_level": len(marks) - 1})).content
        except RemoteGpuError as exc:
            return cell.error(type(exc).__name__, str(exc))
        if not reply.get("found"):
            cell.stream(f"Object `{name}` not found.\n", "stdout")
            return self._ok()
        return {**self._ok(), "payload": [{"source": "page", "data": reply.get("data", {}), "start": 0}]}

    def _cell(self, parent: dict[str, Any]) -> CellOutput:
        """Publishes as replies to the notebook request ``parent``."""
        return CellOutput(self.iopub, parent, self.execution_count, self.comms.ids)

    def _ok(self) -> dict[str, Any]:
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}

    async def _session(self, cell: CellOutput) -> AsyncSession | dict[str, Any]:
        """The leased session, or the reply of a cell that could not get one."""
        session = self.remote.usable
        if session is not None:
            return session
        try:
            got = await self._until_stopped(self.remote.acquire(cell))
        except RemoteGpuError as exc:
            return cell.error(type(exc).__name__, str(exc))
        if got is None:
            return cell.error("KeyboardInterrupt", "interrupted while waiting for a GPU; "
                              "nothing ran and the request left the queue")
        return got[0]

    async def _until_stopped(self, work: Awaitable[T]) -> tuple[T] | None:
        """``(what work gave,)``, or None where the stop button cancelled it."""
        future: asyncio.Future[T] = asyncio.ensure_future(work)
        self._stoppable = future
        try:
            return (await future,)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the kernel's own request was cancelled, not the work
            return None
        finally:
            self._stoppable = None

    async def _run_remote(self, code: str, cell: CellOutput, silent: bool, store_history: bool,
                          allow_stdin: bool) -> dict[str, Any]:
        session = await self._session(cell)
        if isinstance(session, dict):
            return session
        ident = self._parent_ident["shell"]
        inputs: set[asyncio.Task[None]] = set()

        def on_output(msg: m.Output) -> None:
            if msg.msg_type == "input_request":
                task = asyncio.ensure_future(self._forward_input(session, msg.content, cell.parent, ident))
                inputs.add(task)
                return
            cell.forward(msg)

        self._remote_running = session
        try:
            # Under the notebook's own msg_id: what the worker publishes, and
            # an Output widget's msg_id, then route as with a local kernel.
            result = await session.execute(code, on_output, silent=silent, store_history=store_history,
                                           allow_stdin=allow_stdin, on_notice=cell.notice,
                                           on_queue=cell.restoring, parent=cell.header,
                                           on_fetched=cell.inform,
                                           execution_count=0 if silent or not store_history
                                           else self.execution_count)
        except ConnectionLost as exc:
            return cell.error("ConnectionLost", (
                f"{exc}. The cell may still be running on the server. The next cell reconnects to "
                "the same GPU session and shows what it printed meanwhile; its variables are kept "
                "if the server still holds it (within its --grace period)."))
        except RemoteGpuError as exc:
            return cell.error(type(exc).__name__, str(exc))
        finally:
            self._remote_running = None
            for task in inputs:
                task.cancel()
        if result.error is not None:
            return {"status": "error", "execution_count": self.execution_count,
                    "ename": result.error.ename, "evalue": result.error.evalue,
                    "traceback": result.error.traceback}
        if result.status == "aborted":
            return {"status": "aborted", "execution_count": self.execution_count}
        return self._ok()

    async def _forward_input(self, session: AsyncSession, content: dict[str, Any],
                             parent: dict[str, Any], ident: Any) -> None:
        """Ask the notebook for the remote ``input()``'s answer and send it back."""
        value = await self.stdin.ask(str(content.get("prompt", "")), bool(content.get("password")),
                                     parent, ident)
        await session.send_input(value)

    def _run_local(self, cell_def: Cell, cell: CellOutput, silent: bool, store_history: bool) -> dict[str, Any]:
        self._local_running = True
        try:
            result = self.local.run(cell_def.body, cell.parent, self.execution_count, silent=silent,
                                    store_history=store_history, on_error=cell.error)
        finally:
            self._local_running = False
        if result.ok:
            return self._ok()
        return {"status": "error", "execution_count": self.execution_count, "ename": result.ename,
                "evalue": result.evalue, "traceback": result.traceback}

    async def _run_command(self, command: GpuCommand, cell: CellOutput) -> dict[str, Any] | None:
        """Run one ``%gpu`` line; the error reply if it failed, else None."""
        if command.name == "status":
            current = self.remote.session
            if current is None:
                cell.stream("Remote GPU: no GPU leased; the next cell that needs one leases it\n",
                            "stdout")
            elif current.parked:
                cell.stream(f"Remote GPU: session {current.id[:8]} is parked: no GPU is held, and the "
                            "next cell restores it\n", "stdout")
            else:
                state = "connected" if current.connected else "disconnected"
                cell.stream(f"Remote GPU: session {current.id[:8]} on {', '.join(current.slots)} "
                            f"from {self.remote.url} ({state})\n", "stdout")
            return None
        if command.name == "release":
            await self.remote.release()
            cell.stream("Remote GPU: released the GPU; its variables are gone\n", "stdout")
            return None
        if command.name == "fetch":
            self.remote.set_fetch(command.args == ("on",))
            where = "this notebook's folder" if self.remote.fetch else "nowhere"
            cell.stream(f"{notices.PREFIX}remote cells fetch the files they open from {where}\n", "stdout")
            return None
        if command.name == "park" and self.remote.session is None:
            cell.stream("Remote GPU: no GPU session to park\n", "stdout")
            return None
        session = await self._session(cell)
        if isinstance(session, dict):
            return session
        try:
            if command.name == "park":
                parked = await session.park()
                cell.stream(f"{notices.PREFIX}{parked.text}\n", "stdout")
            elif command.name == "resume":
                if session.parked:
                    self._remote_running = session  # the stop button stops the wait
                    try:
                        await session.resume(on_queue=cell.restoring, on_notice=cell.notice)
                    finally:
                        self._remote_running = None
                else:
                    cell.stream(f"{notices.PREFIX}the session is not parked\n", "stdout")
            elif command.name in ("upload", "download"):
                session.on_progress = cell.transfer_lines()
                moved = await self._until_stopped(session.upload(*command.args) if command.name == "upload"
                                                  else session.download(*command.args))
                if moved is None:
                    return _stopped(cell, command.name)
                cell.show(notices.transferred(f"{command.name}ed", moved[0]))
            elif command.name == "env":
                reply = await self._run_remote(notices.env_code(command.args[0]), cell, silent=False,
                                               store_history=False, allow_stdin=False)
                if reply["status"] != "ok":
                    return reply
            elif command.name == "push":
                missing = [n for n in command.args if n not in self.local.user_ns]
                if missing:
                    return cell.error("NameError", f"name {missing[0]!r} is not defined in the local "
                                      "namespace (define it in a %%local cell)")
                session.on_progress = cell.transfer_lines()
                if await self._until_stopped(session.push(**{n: self.local.user_ns[n] for n in command.args})) is None:
                    return _stopped(cell, command.name)
            else:
                session.on_progress = cell.transfer_lines()
                pulled = await self._until_stopped(session.pull(*command.args))
                if pulled is None:
                    return _stopped(cell, command.name)
                self.local.user_ns.update(pulled[0])
        except RemoteGpuError as exc:
            ename = getattr(exc, "ename", type(exc).__name__)
            return cell.error(ename, getattr(exc, "evalue", str(exc)))
        except TypeError as exc:
            return cell.error(type(exc).__name__, str(exc))
        finally:
            session.on_progress = None
        return None

    # -- other requests -----------------------------------------------------

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        session = self.remote.usable
        if session is None or session.parked or parse_cell_is_local(code):
            return self.local.complete(code, cursor_pos)
        reply = await session.shell_request("complete_request", {"code": code, "cursor_pos": cursor_pos})
        return reply.content

    async def do_inspect(self, code: str, cursor_pos: int, detail_level: int = 0,
                         omit_sections: Any = ()) -> dict[str, Any]:
        session = self.remote.usable
        if session is None or session.parked or parse_cell_is_local(code):
            return self.local.inspect(code, cursor_pos, detail_level)
        reply = await session.shell_request("inspect_request", {
            "code": code, "cursor_pos": cursor_pos, "detail_level": detail_level})
        return reply.content

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        from IPython.core.inputtransformer2 import TransformerManager

        transformer = TransformerManager()  # type: ignore[no-untyped-call, unused-ignore]
        status, indent = transformer.check_complete(code)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    async def do_history(self, hist_access_type: str, output: bool, raw: bool, session: int | None = None,
                         start: int | None = None, stop: int | None = None, n: int | None = None,
                         pattern: str | None = None, unique: bool = False) -> dict[str, Any]:
        return {"status": "ok",
                "history": self.history.query(hist_access_type, output, start, stop, n, pattern, unique)}

    async def comm_info_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        content = await self.comms.info(parent["content"])
        self.iopub.session.send(stream, "comm_info_reply", content, parent, ident)

    async def _comm_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """Forward a comm message from the notebook to the worker's comm (see :mod:`.comms`)."""
        msg_type, content = parent["header"]["msg_type"], dict(parent["content"])
        cell = self._cell(parent)
        self.parents.remember(parent)
        self.after_idle.begin(parent)
        # ipykernel 7 runs a comm message that comes while a cell runs at the
        # same time as the cell (a remote cell may await a widget), and then
        # sends it no status. A widget holds back its changes until the idle
        # of its last message, so this kernel sends busy and idle itself, and
        # busy again for the cell that still runs.
        running = self._running_parent if self._main_asyncio_lock.locked() else None
        if running is not None:
            self._publish_status("busy", "shell", parent)
        try:
            await self.comms.forward(msg_type, content, cell, parent)
        finally:
            if running is not None:
                self._publish_status("idle", "shell", parent)
                if self._running_parent is running:
                    self._publish_status("busy", "shell", running)

    def _background(self, msg: m.Output) -> None:
        """What the worker published outside any request of ours, under the
        notebook request it names (a thread's print after its cell ended);
        after that request's idle, as ipykernel publishes it (see :class:`AfterIdle`)."""
        if not self.after_idle.hold(msg):
            self._cell(self.parents.get(msg.parent)).forward(msg)

    def _publish_status(self, status: str, channel: str, parent: dict[str, Any] | None = None) -> None:
        super()._publish_status(status, channel, parent)  # type: ignore[no-untyped-call, unused-ignore]
        if status == "idle":
            request = parent or self.get_parent(channel)  # type: ignore[no-untyped-call, unused-ignore]
            for msg in self.after_idle.end(request):
                self._cell(request).forward(msg)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Give the GPU back; runs on the control thread, the session lives on the main loop."""
        loop = self._loop
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.remote.release(), loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), RELEASE_TIMEOUT)
            except Exception:
                self.log.warning("could not release the GPU lease at shutdown", exc_info=True)
        return {"status": "ok", "restart": restart}


def _stopped(cell: CellOutput, what: str) -> dict[str, Any]:
    """The reply of a transfer that the stop button stopped."""
    return cell.error("KeyboardInterrupt", f"interrupted: the {what} stopped before it was done; "
                      "run it again to move it whole")


class RemoteGpuKernelApp(MainLoopKernelApp):
    """The Remote GPU kernel's application: no shell-channel thread (see
    :class:`~remote_gpu_core.ipykernel_app.MainLoopKernelApp`)."""


def parse_cell_is_local(code: str) -> bool:
    """Whether ``code`` is a ``%%local`` cell (malformed ``%gpu`` lines count as remote)."""
    try:
        return parse_cell(code).kind is CellKind.LOCAL
    except CellSyntaxError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Run the kernel as Jupyter starts it: ``-f CONNECTION_FILE``."""
    RemoteGpuKernelApp.launch_instance(argv=sys.argv[1:] if argv is None else argv,
                                kernel_class=RemoteGpuKernel)
