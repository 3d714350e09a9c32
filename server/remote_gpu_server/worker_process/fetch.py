"""Files of the notebook's folder, fetched when a cell opens them: the worker's side.

Runs inside the worker (see :mod:`.kernel`). A PEP 578 audit hook sees
every ``open`` event of the process: ``open()`` and ``io.open`` (numpy's
``np.load``, pandas' ``read_csv``, PIL's ``Image.open``, ``torch.load``
all open files through them) and ``os.open``. When the path is relative,
the open is for reading only, the worker's working folder is inside the
session's folder and nothing is there by that name, the hook asks the
server for it and waits: on the server's comm (:data:`.kernel.COMM_TARGET`)
it publishes ``{"op": "fetch", "fetch": N, "path": NAME}``, ``NAME``
relative to the session's folder, and the server asks the client that runs
the cell (see :mod:`remote_gpu_server.sessions.fetching`). The file's bytes
then come through the data channel as transfer :func:`fetch_tid` ``(N)``,
into a :class:`~.files.FileSink` (a temporary name, renamed into place when
all of it came), and the open goes on and finds the local copy. If the
file is not sent, the server aborts that transfer with a JSON reason
(``{"code": ..., "message": ...}``, a :class:`~m.FetchRefusal` code): a
file that is missing, or fetching that is off, lets the open fail as it
would have (FileNotFoundError, with the session folder's hint); a refused
one fails it with :class:`~remote_gpu_core.errors.FetchRefused` and the
client's reason.

What is not intercepted: writes (any of ``O_WRONLY``, ``O_RDWR``,
``O_CREAT``, ``O_APPEND``, ``O_TRUNC``; writing back stays ``%gpu
download``), absolute paths (the GPU machine's own files), opens by file
descriptor, source files that tracebacks look for (through
:mod:`linecache`), pseudo-files (``<string>``), and checks that raise no audit event (``os.stat``,
``os.path.exists``, ``os.listdir`` of a folder that is only on the
notebook's machine). A fetch happens once per file: the copy stays in the
session's folder for later opens, until the client says that the file
changed beside the notebook (``Execute.refetch``); the server's ``{"op":
"forget", "paths": [...]}`` then drops each copy that is still as it came
(:meth:`Fetcher.forget`: a copy the cell wrote to, replaced or removed is
the cell's own and stays), and the next open fetches the file again.

The cost for files that exist: a string comparison for every other event,
and for a relative read an ``os.path.lexists`` (one ``lstat``).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from types import FrameType
from typing import Any, Protocol

from remote_gpu_core.errors import FetchRefused, FileTransferError

__all__ = ["FETCH_TIDS", "FetchNotSent", "Fetcher", "fetch_tid", "install", "refusal_reason"]

#: Transfer ids of fetched files start here: the server numbers its own
#: transfers from 1, so the two never meet.
FETCH_TIDS = 1 << 31
#: Modules that open files to show source code, not to read data (see :func:`_reading_source`).
_SOURCE_READERS = frozenset({"linecache", "tokenize"})
#: Flags of an open that writes: such an open is never intercepted.
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def fetch_tid(fetch: int) -> int:
    """The data channel's transfer id of fetch number ``fetch``."""
    return FETCH_TIDS + fetch


def refusal_reason(code: str, message: str) -> str:
    """The reason of the abort that refuses a fetch (read back by :class:`FetchNotSent`)."""
    return json.dumps({"code": code, "message": message})


class Channel(Protocol):
    """What a fetch uses of the worker's data channel (:class:`.channel.WorkerChannel`)."""

    def receive(self, tid: int, sink: Any = None) -> Any: ...

    def give_up(self, tid: int, reason: str) -> None: ...


class Fetcher:
    """The audit hook's state; see the module docstring.

    :meth:`attach` gives it the server's comm (once the server opened it)
    and :meth:`enter` the session's folder; until both, it fetches nothing.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.comm: Any = None
        self.root: str | None = None
        self._count = 0
        self._lock = threading.Lock()
        self._inside = threading.local()
        self._pid = os.getpid()
        #: The copies fetched, by name in the session's folder: their size, modification time and inode.
        self.fetched: dict[str, tuple[int, int, int]] = {}

    def attach(self, comm: Any) -> None:
        self.comm = comm

    def enter(self, root: str) -> None:
        self.root = os.path.realpath(root)

    def forget(self, names: list[Any]) -> list[str]:
        """Drop the copies of the fetched files ``names`` that are as they came;
        the names of those dropped. A name this worker did not fetch is ignored."""
        dropped = []
        for name in names:
            stamp = self.fetched.pop(name, None) if isinstance(name, str) else None
            if stamp is None or self.root is None:
                continue
            target = os.path.join(self.root, name)
            with self._lock:  # not while a fetch lands
                try:
                    if _stamp(os.lstat(target)) == stamp:
                        os.unlink(target)
                        dropped.append(name)
                except OSError:
                    continue  # gone already, or the folder changed under it: nothing to drop
        return dropped

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        """The audit hook: cheap for every event but a relative read of a missing file."""
        if event != "open":
            return
        path, flags = args[0], args[2]
        if isinstance(path, int) or self.root is None or self.comm is None:
            return
        if isinstance(flags, int) and flags & _WRITING:
            return
        try:
            path = os.fsdecode(path)
        except TypeError:
            return
        if not path or os.path.isabs(path) or os.path.lexists(path):
            return
        if getattr(self._inside, "active", False) or os.getpid() != self._pid:
            return  # the fetch's own opens; a forked child has no channel of its own
        self._inside.active = True
        try:
            self._fetch(path)
        finally:
            self._inside.active = False

    def _fetch(self, path: str) -> None:
        root = self.root
        assert root is not None
        cwd = os.getcwd()
        if cwd != root and not cwd.startswith(root + os.sep):
            return  # the cell moved out of the session's folder: its files are not the notebook's
        if (path.startswith("<") and path.endswith(">")) or _reading_source():
            return  # a pseudo-file ("<string>", "<frozen os>"), or source for a traceback
        target = os.path.normpath(os.path.join(cwd, path))
        name = os.path.relpath(target, root)
        with self._lock:  # one fetch at a time on the one data channel
            self._count += 1
            tid = fetch_tid(self._count)
            self.comm.send({"op": "fetch", "fetch": self._count, "path": name})
            self._receive(tid, name, target)

    def _receive(self, tid: int, name: str, target: str) -> None:
        from pathlib import Path

        from .files import FileSink

        sinks: list[FileSink] = []
        refused: BaseException | None = None
        if name == ".." or name.startswith(".." + os.sep):
            # Outside the session's folder: nothing is written, whatever comes.
            refused = FetchRefused(f"{name!r} is outside the session's folder")

        def make_sink(sizes: list[int]) -> FileSink:
            sinks.append(FileSink([Path(target)], sizes, refused))
            return sinks[-1]

        try:
            self.channel.receive(tid, make_sink)
        except FetchNotSent as exc:
            if exc.refusal == "refused":
                raise FetchRefused(f"{exc.message}; the cell's open of {name!r} failed") from None
            return  # missing, or off: the open fails as it would have
        except BaseException as exc:
            for sink in sinks:
                sink.abandon()
            if not isinstance(exc, (TimeoutError, ValueError)):  # those told the server already
                self.channel.give_up(tid, f"the fetch was given up: {type(exc).__name__}")
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise FetchRefused(f"fetching {name!r} from your notebook's folder failed: {exc}") from None
            raise
        try:
            sinks[-1].finish()
            self.fetched[name] = _stamp(os.lstat(target))
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"fetching {name!r} from your notebook's folder failed: "
                          f"{exc.strerror or exc}", name) from None


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ino


def _reading_source() -> bool:
    """Whether the open comes from :mod:`linecache` (a traceback, ``inspect``,
    IPython's ``??``) looking for a module's source: compiled modules name
    theirs relatively (``zmq/backend/cython/_zmq.py``), and those are not
    the notebook's files. Walked only for a missing file, where a fetch's
    round trip would cost far more."""
    frame: FrameType | None = sys._getframe(3)
    while frame is not None:
        if frame.f_globals.get("__name__") in _SOURCE_READERS:
            return True
        frame = frame.f_back
    return False


class FetchNotSent(FileTransferError, ConnectionError):
    """The server ended a fetch's transfer before it began, with no file:
    ``refusal`` (a :class:`~m.FetchRefusal` value, else ``refused``) and
    the message say why (see :func:`refusal_reason`). Code ``file_error``."""

    def __init__(self, reason: str) -> None:
        try:
            data = json.loads(reason)
            refusal, message = str(data["code"]), str(data["message"])
        except (ValueError, KeyError, TypeError):
            refusal, message = "refused", reason
        super().__init__(message)
        self.refusal = refusal
        self.message = message


def install(channel: Channel) -> Fetcher:
    """Add the audit hook (for the life of the process); returns its :class:`Fetcher`."""
    fetcher = Fetcher(channel)
    sys.addaudithook(fetcher.hook)
    return fetcher
