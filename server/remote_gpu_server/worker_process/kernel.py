"""The code that runs inside a worker: an ipykernel plus variable transfer.

Started as ``python -m remote_gpu_server.worker_process.kernel -f CONNECTION_FILE``
with ``CUDA_VISIBLE_DEVICES`` already in its environment. Before it answers
its first request it imports what ``rgpu serve --preload`` names (torch by
default, when installed) and initialises CUDA when a GPU is visible, so that
a leased worker's first cell pays neither.

Variables travel in two parts. The request and its answer are an operation
(:mod:`.operations`: notes on the data channel), in the kernel's main
thread, between the cells:
``{"op": "push"|"pull", "id": N, "names": [...], "counts": [...]}``
(large buffers named by digest, see :mod:`.variables`)
and ``{"id": N, "ok": true, ...}`` or ``{"id": N, "ok": false, "ename",
"evalue"}``. The buffers themselves go through the shared-memory ring that
the server passed as ``RGPU_DATA_RING_FD``, with notes on this worker's
end of a socket pair that the server made (``RGPU_DATA_ADDR``:
``fd://N``), as described in :mod:`.transfer` and :mod:`.streams`. A
push's request comes first and its handler reads the buffers as the
server forwards them; a pull's answer (names, counts, sizes) is sent once
the pickling succeeded, and its buffers after it, while the server passes
them on to the client.
Only this process unpickles what a client pushed. Files go the same way
(``{"op": "upload"|"download", "paths": [...]}``, relative to the session
folder that ``enter`` named; see :mod:`.worker_files`). A cell that opens
a file the session's folder lacks has it fetched from the notebook's
folder (:mod:`.fetch`: an audit hook that asks on the server's comm,
:data:`COMM_TARGET`).

Isolation: before anything else, the worker confines itself as the server's
``RGPU_CONFINE`` spec says (:func:`.confinement.prepare`), and at lease time
the server's ``{"op": "enter", "id": N, "spec": {...}}`` operation makes
it its user's (:func:`.confinement.enter`) before any cell runs.

Output of forked children reaches the kernel on an ``ipc://`` socket in
the worker's private ``/tmp``, not on ipykernel's loopback TCP port, which
every process on the host could send to (see :mod:`.iopub`).

Parking: ``{"op": "park", "id": N, "folder": PATH, "limit": BYTES|null}``
saves the namespace into the session folder and ``{"op": "restore", "id":
N, "folder": PATH}`` loads it into a fresh worker (see
:mod:`.parked_namespace`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .channel import WorkerChannel

__all__ = ["COMM_TARGET", "COUNT_KEY", "DEFAULT_PRELOAD", "PRELOAD_VAR", "die_with_parent", "main"]

COMM_TARGET = "rgpu.vars"
#: The key of an ``execute_request``'s metadata that gives the cell's number:
#: the notebook's, so that ``Cell In[N]`` in a traceback matches its prompt,
#: in a worker that replaced one that died as in the first.
COUNT_KEY = "rgpu_execution_count"


#: The environment variable that names what a worker imports before its lease
#: (``rgpu serve --preload``): module names, comma-separated; absent means
#: :data:`DEFAULT_PRELOAD`, empty means nothing.
PRELOAD_VAR = "RGPU_PRELOAD"
DEFAULT_PRELOAD = "torch"


def _preload() -> None:
    """Import what the server named, so that a leased worker's first cell pays
    nothing for it; torch also initialises CUDA when a GPU is visible. A
    module that is not installed is skipped: said on stderr (the server's
    log), unless it is the default torch on a machine without it."""
    # A lease activates its user's site: imported now, not at the lease's cost.
    from . import user_site as _user_site

    explicit = PRELOAD_VAR in os.environ
    named = os.environ.pop(PRELOAD_VAR, DEFAULT_PRELOAD)
    for name in filter(None, (part.strip() for part in named.split(","))):
        try:
            module = __import__(name)
        except ImportError as exc:
            if explicit:
                print(f"remote-gpu worker: could not preload {name}: {exc}", file=sys.stderr, flush=True)
            continue
        if name == "torch" and module.cuda.is_available():
            module.cuda.init()


def _handle(shell: Any, channel: WorkerChannel, data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Do one transfer request: ``(reply, then)``, where ``then`` (or None)
    runs after the reply is sent."""
    op = data.get("op")
    if op == "enter":  # isolation hook: only the server can send it, once, before any cell
        from .confinement import EnterSpec, enter

        spec = EnterSpec.from_json(dict(data["spec"]))
        enter(spec)
        die_with_parent()  # a change of credentials cleared it
        problem = None
        if spec.cwd:
            _enter_folder(spec.cwd)
            problem = _activate_site(shell, spec.cwd, spec.site)
            if _fetcher is not None:
                _fetcher.enter(spec.cwd)
        return {"ok": True, "site_problem": problem}, None
    if op in ("upload", "download"):
        return _handle_files(channel, op, data)
    if op == "forget":  # fetched files that changed beside the notebook
        return {"dropped": _fetcher.forget(list(data["paths"])) if _fetcher is not None else []}, None
    if op == "push":
        from . import variables

        tid = int(data["id"])
        return variables.push(shell.user_ns, _cache, data, lambda sink: channel.receive(tid, sink)), None
    if op == "holding":
        from . import variables

        return variables.holding(_cache, data), None
    if op == "pull":
        from . import variables

        reply, bufs = variables.pull(shell.user_ns, data)
        return reply, lambda: channel.send(int(data["id"]), bufs)
    if op == "park":
        return _park(shell, str(data["folder"]), data.get("limit")), None
    if op == "restore":
        return _restore(shell, str(data["folder"])), None
    raise ValueError(f"unknown variable transfer op {op!r}")


def _park(shell: Any, folder: str, limit: int | None) -> dict[str, Any]:
    """Save the namespace for a parked session (see :mod:`.parked_namespace`)."""
    from .parked_namespace import savable_names, save

    names = savable_names(shell.user_ns, shell.user_ns_hidden)
    saved = save({n: shell.user_ns[n] for n in names}, folder, None if limit is None else int(limit),
                 namespace=shell.user_ns, execution_count=shell.execution_count)
    return {"ok": True, "names": list(saved.names), "unsaved": dict(saved.unsaved), "nbytes": saved.nbytes,
            "seconds": saved.seconds}


def _restore(shell: Any, folder: str) -> dict[str, Any]:
    """Load a parked session's namespace into this fresh worker, then delete its files."""
    import shutil

    from .parked_namespace import load, read_manifest

    restored = load(folder, shell.user_ns)
    shell.user_ns.update(restored.values)
    shell.execution_count = max(shell.execution_count, int(read_manifest(folder).get("execution_count") or 0))
    shutil.rmtree(folder, ignore_errors=True)
    return {"ok": True, "names": list(restored.values), "failed": dict(restored.failed),
            "unsaved": dict(restored.unsaved), "notes": list(restored.notes), "nbytes": restored.nbytes,
            "seconds": restored.seconds}


_folder: Any = None  # the session's worker_files.Folder, once the server said which
_cache: Any = None  # the session's buffer_cache.BufferCache, made in main()
_fetcher: Any = None  # the audit hook's fetch.Fetcher, once installed


def _activate_site(shell: Any, cwd: str, site: str | None) -> str | None:
    """The user's own packages (see :mod:`.user_site`): in their site ``site``,
    else for the session only, in its folder ``cwd``. What went wrong with their
    site is returned (for the server's log) and said by ``%pip`` and ``%gpu env``,
    never printed into a cell that did not ask."""
    from .user_site import SESSION_ONLY, activate

    problem = None
    if site is not None:
        try:
            activate(shell, site)
            return None
        except OSError as exc:
            problem = f"your own site for packages at {site} could not be made ready: {exc}"
    folder = os.path.join(cwd, ".packages")
    try:
        activate(shell, folder, why=problem or SESSION_ONLY)
    except OSError as exc:  # no site at all: %pip is IPython's own
        problem = f"{problem or SESSION_ONLY}; nor could packages go to {folder}: {exc}"
    return problem


def _enter_folder(path: str) -> None:
    """Make ``path`` (the session's folder, the worker's working folder) the root of file transfers."""
    from .files import Folder

    global _folder
    _folder = Folder(path)


def _handle_files(channel: WorkerChannel, op: str, data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The file operations of :mod:`.worker_files`: ``upload`` and ``download``."""
    from .files import FileSink

    if op == "upload":
        paths = [str(p) for p in data.get("paths") or []]
        targets, refused = [], None
        try:
            if _folder is None:
                raise PermissionError("this worker has no session folder")
            targets = [_folder.resolve(p) for p in paths]
        except (PermissionError, OSError) as exc:
            refused = exc
        sinks: list[FileSink] = []

        def make_sink(sizes: list[int]) -> FileSink:
            sinks.append(FileSink(targets, sizes, refused))
            return sinks[-1]

        try:
            channel.receive(int(data["id"]), make_sink)
        except BaseException:
            for sink in sinks:
                sink.abandon()
            raise
        sinks[-1].finish()
        return {"ok": True, "paths": paths, "sizes": [t.stat().st_size for t in targets]}, None
    if _folder is None:
        raise PermissionError("this worker has no session folder")
    names, buffers = _folder.read([str(p) for p in data.get("paths") or []])
    sizes = [memoryview(b).nbytes for b in buffers]

    def send() -> None:
        try:
            channel.send(int(data["id"]), buffers)
        finally:
            for buf in buffers:
                try:
                    if hasattr(buf, "close"):
                        buf.close()
                except BufferError:
                    pass  # a view is still held; the map goes with it

    return {"ok": True, "paths": names, "sizes": sizes}, send


def _comm_opener() -> Any:
    """The server's comm: what a cell's fetch asks on (see :mod:`.fetch`)."""
    def on_open(comm: Any, open_msg: Any) -> None:
        if _fetcher is not None:
            _fetcher.attach(comm)

    return on_open


def die_with_parent() -> None:
    """Ask Linux to kill this process when the process that started it dies.

    A worker outlives nothing: not a server killed with SIGKILL, not a Ray
    host actor whose node went away. Credentials changes clear the setting:
    call again after dropping privileges.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = int(os.environ.pop("RGPU_PARENT_PID", "0") or 0)
    if parent and os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _kernel_class() -> Any:
    from ipykernel.ipkernel import IPythonKernel

    from remote_gpu_core.ipykernel_app import CommsBesideCells, MainLoopShell

    class WorkerKernel(MainLoopShell, CommsBesideCells, IPythonKernel):
        """ipykernel's kernel, with an idle status after every comm message,
        the cell numbers the server gives (:data:`COUNT_KEY`), and its
        versions in its kernel info (:data:`FINGERPRINT_KEY`).

        ipykernel 7 handles a comm message that arrives while a cell awaits
        at the same time as the cell, and then sends no status for it; the
        server ends a comm request at its idle status, so it sends one.
        """

        @property
        def kernel_info(self) -> dict[str, Any]:
            from remote_gpu_core.fingerprint import FINGERPRINT_KEY, local_fingerprint

            return {**super().kernel_info, FINGERPRINT_KEY: dict(local_fingerprint())}

        async def execute_request(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
            count = (parent.get("metadata") or {}).get(COUNT_KEY)
            if isinstance(count, int) and not isinstance(count, bool) and count > 0 and self.shell is not None:
                self.shell.execution_count = count
            await super().execute_request(stream, ident, parent)

        async def dispatch_shell(self, msg: Any, /, subshell_id: str | None = None, *,
                                 concurrent: bool = False) -> None:
            await super().dispatch_shell(msg, subshell_id=subshell_id, concurrent=concurrent)
            if concurrent:
                self._publish_status("idle", "shell", parent=self.get_parent("shell"))

    return WorkerKernel


def _app_class() -> Any:
    import zmq

    from remote_gpu_core.ipykernel_app import MainLoopKernelApp

    from .confinement import IOPUB_DIR_VAR
    from .iopub import PrivatePipe

    class WorkerKernelApp(MainLoopKernelApp):
        """The kernel app, with the IOPub pipe of :mod:`.iopub`."""

        def init_iopub(self, context: Any) -> None:
            # As IPKernelApp.init_iopub, with PrivatePipe for IOPubThread.
            self.iopub_socket = context.socket(zmq.XPUB)
            self.iopub_socket.linger = 1000
            self._apply_curve_server_options(self.iopub_socket)
            self.iopub_port = self._bind_socket(self.iopub_socket, self.iopub_port)
            self.log.debug("iopub PUB Channel on port: %i", self.iopub_port)
            self.configure_tornado_logger()
            self.iopub_thread = PrivatePipe(self.iopub_socket, os.environ.pop(IOPUB_DIR_VAR, None),
                                            session=self.session)
            self.iopub_thread.start()
            self.iopub_socket = self.iopub_thread.background_socket

    return WorkerKernelApp


def main(argv: list[str] | None = None) -> None:
    # Isolation hook: first, while this process is one thread (see confinement.py).
    from .confinement import prepare_from_environ

    spawn = prepare_from_environ()
    die_with_parent()
    _preload()
    app = _app_class().instance(kernel_class=_kernel_class())
    app.initialize(sys.argv[1:] if argv is None else argv)
    from . import errors as worker_errors

    worker_errors.enable_fault_report()  # after ipykernel's own faulthandler setup
    limit = spawn.limit_text if spawn is not None and spawn.data_limit is not None else None
    processes = (worker_errors.ProcessLimit(spawn.pids_limit, spawn.pids_events)
                 if spawn is not None and spawn.pids_limit is not None else None)
    worker_errors.install(app.shell, limit, processes)
    if spawn is not None and spawn.data_limit is not None:
        # Memory kept warm for received buffers counts towards RLIMIT_DATA
        # even while unused (a memory cgroup would reclaim it): keep little.
        from remote_gpu_core.warm_memory import warm_memory

        warm_memory.kept = min(warm_memory.kept, spawn.data_limit // 8)
    # ipykernel sleeps 0.5 ms before each execute_reply so that a client
    # that stops at the reply has the streams first; the server waits for
    # the idle status, which comes after the streams, so it only adds latency.
    app.kernel._execute_sleep = 0.0
    from remote_gpu_core.ipykernel_app import skip_empty_flushes

    for stream in (sys.stdout, sys.stderr):  # ipykernel's OutStreams, made by initialize()
        skip_empty_flushes(stream)
    ring_fd = os.environ.pop("RGPU_DATA_RING_FD", None)
    tls = tuple(os.environ.pop(name, "").encode() for name in
                ("RGPU_DATA_TLS_KEY", "RGPU_DATA_TLS_CERT", "RGPU_DATA_TLS_PEER"))
    channel = WorkerChannel(os.environ.pop("RGPU_DATA_ADDR"), int(ring_fd) if ring_fd else None,
                           tls if all(tls) else None)  # type: ignore[arg-type]
    from .buffer_cache import BufferCache, raise_file_limit

    global _cache
    _cache = BufferCache()
    raise_file_limit()
    app.kernel.comm_manager.register_target(COMM_TARGET, _comm_opener())
    from .operations import Listener  # the server asks its operations on the data channel

    Listener(channel, lambda data: _handle(app.shell, channel, data)).start()
    from .files import install_hint

    install_hint(app.shell)
    global _fetcher
    from . import fetch

    _fetcher = fetch.install(channel)
    app.start()


if __name__ == "__main__":
    main()
