"""Files in a worker's session folder: paths, uploads, downloads, hints.

Runs inside the worker (see :mod:`.kernel`). The server hands the
worker its session's folder with a ``chdir`` operation; from then on every
path of an upload or a download is relative to that folder and must stay in
it: an absolute path, a ``..`` and a symbolic link that leads out are
refused (:class:`PathRefused`), checked on the real path, after links.

Uploads arrive through the data channel into :class:`FileSink`, which
writes each file to a temporary name next to it and renames it into place
only when all of it came; a refused or broken upload leaves nothing behind
and still reads its bytes to the end, so the channel stays in step.
Downloads are sent from read-only memory maps of the files.

Two hints go under a remote cell's error: where a relative path that was
not found is looked for, and, when a write fails for want of space, that
the user's session folders share one disk limit and how to free it.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from remote_gpu_core.errors import FileTransferError

__all__ = ["FileSink", "Folder", "PathRefused", "disk_full_hint", "file_not_found_hint", "install_hint"]

#: Shown under a FileNotFoundError for a relative path in a remote cell.
HINT = ("Hint: this cell runs on the GPU server, in your session's own folder there; a file it "
        "opens that is not there is fetched from your notebook's folder, and this one is not there "
        "either (or fetching is off: %gpu fetch on, RGPU_FETCH); send other files with %gpu upload PATH")
#: The environment variable with the user's disk limit (the server's ``isolation.DISK_VAR``).
DISK_VAR = "RGPU_SESSION_DISK"
#: Shown under an error of a write that found no space (``{limit}``: the user's disk limit).
DISK_HINT = ("Hint: on this GPU server your session folders (this session's, your other sessions' and "
             "your parked ones) share {limit} of disk (rgpu serve --session-disk), and that is used up: "
             "delete files you no longer need (os.remove, shutil.rmtree; %gpu download what you want to "
             "keep first), or release a parked session")
#: Errors of a write past a disk limit: no space, over a quota, a file over RLIMIT_FSIZE.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: Where a full disk is not the session folders' (private tmpfs, sized by memory).
_NOT_SESSION_DISK = ("/tmp", "/var/tmp", "/dev/shm")


class PathRefused(FileTransferError, PermissionError):
    """A path that is not inside the session's folder; the message says why.
    Code ``file_error``, as every refused transfer (see :mod:`remote_gpu_server.errors`)."""


class Folder:
    """The session's folder (``root``, a real path) and the paths inside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(root))

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` (relative to the folder); PathRefused if outside."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise PathRefused(f"{path!r} is not a file name")
        pure = PurePosixPath(path)
        if pure.is_absolute():
            raise PathRefused(f"{path!r} is an absolute path: give a path inside the session's folder, "
                              "relative to it")
        if ".." in pure.parts:
            raise PathRefused(f"{path!r} goes up with '..': paths stay inside the session's folder")
        real = Path(os.path.realpath(self.root / pure))
        if real != self.root and self.root not in real.parents:
            raise PathRefused(f"{path!r} leads out of the session's folder (through a symbolic link)")
        return real

    def files(self, paths: list[str]) -> list[tuple[str, Path]]:
        """``(name, real path)`` of each regular file that ``paths`` name; a
        folder stands for the files under it (links that lead out are refused)."""
        out: list[tuple[str, Path]] = []
        for path in paths:
            real = self.resolve(path)
            if real.is_dir():
                for dirpath, dirnames, filenames in os.walk(real):
                    dirnames.sort()
                    for name in sorted(filenames):
                        rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                        inner = self.resolve(rel)
                        if inner.is_file():
                            out.append((rel, inner))
            elif real.is_file():
                out.append((path, real))
            elif real.exists():
                raise PathRefused(f"{path!r} is not a regular file")
            else:
                raise FileNotFoundError(f"no file {path!r} in the session's folder on the GPU server")
        return out

    def read(self, paths: list[str]) -> tuple[list[str], list[Any]]:
        """Names and contents (memory maps, or b"" for empty files) of ``paths``."""
        names, buffers = [], []
        for name, real in self.files(paths):
            with open(real, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buffers.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
            names.append(name)
        return names, buffers


class FileSink:
    """Writes the pieces of an upload to ``targets`` (sizes from the transfer).

    Has the interface of :class:`~remote_gpu_server.worker_process.transfer.Filler`
    (``add``, ``done``). With ``error`` set (a refused path) or after a
    write fails, pieces are read and dropped; :meth:`finish` then raises
    the error and removes what was written.
    """

    def __init__(self, targets: list[Path], sizes: list[int], error: BaseException | None = None) -> None:
        self.error = error
        if error is None and len(targets) != len(sizes):
            self.error = ValueError("the upload's paths and files do not match")
        self._targets = targets
        self._sizes = sizes
        self._index = -1
        self._left = 0
        self._file: Any = None
        self._temps: list[str] = []
        self._advance()

    def _advance(self) -> None:
        """Close the current file and open the next, past empty ones."""
        while True:
            self._close_file()
            self._index += 1
            if self._index >= len(self._sizes):
                return
            self._open(self._targets[self._index] if self.error is None else None)
            self._left = self._sizes[self._index]
            if self._left:
                return

    def _open(self, target: Path | None) -> None:
        if target is None:
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".upload-", dir=target.parent)
            self._temps.append(temp)
            os.fchmod(fd, 0o644)
            self._file = os.fdopen(fd, "wb")
        except OSError as exc:
            self.error = exc

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or exc
            self._file = None

    def add(self, piece: Any) -> None:
        data = memoryview(piece).cast("B")
        while data.nbytes:
            if self.done:
                raise ValueError("more bytes arrived than the upload announced")
            take = min(self._left, data.nbytes)
            if self._file is not None and self.error is None:
                try:
                    self._file.write(data[:take])
                except OSError as exc:
                    self.error = exc
            data = data[take:]
            self._left -= take
            if not self._left:
                self._advance()

    @property
    def done(self) -> bool:
        return self._index >= len(self._sizes)

    def finish(self) -> None:
        """Move the files into place; or remove them and raise the error."""
        self._close_file()
        if self.error is None and not self.done:
            self.error = ConnectionError("the upload ended before all its bytes came")
        if self.error is None:
            for temp, target in zip(self._temps, self._targets):
                os.replace(temp, target)  # replaces a link itself, never what it points to
            return
        for temp in self._temps:
            try:
                os.unlink(temp)
            except OSError:
                pass
        raise self.error

    def abandon(self) -> None:
        """The transfer broke: remove what was written."""
        self.error = self.error or ConnectionError("the upload was cut short")
        try:
            self.finish()
        except BaseException:
            pass


def file_not_found_hint(value: BaseException) -> str | None:
    """The hint for a FileNotFoundError about a relative path, else None."""
    filename = getattr(value, "filename", None)
    if isinstance(value, FileNotFoundError) and isinstance(filename, (str, bytes)) \
            and filename and not os.path.isabs(filename):
        return HINT
    return None


def disk_full_hint(value: BaseException, limit: str | None) -> str | None:
    """The hint for a write that found no space in the session folders (the user's
    disk limit, ``limit`` as people read it), else None."""
    if limit is None or not isinstance(value, OSError) or value.errno not in _DISK_FULL:
        return None
    filename = getattr(value, "filename", None)
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if isinstance(filename, str) and os.path.isabs(filename) \
            and any(filename == p or filename.startswith(p + "/") for p in _NOT_SESSION_DISK):
        return None
    return DISK_HINT.format(limit=limit)


def install_hint(shell: Any) -> None:
    """Add :data:`HINT` under a remote cell's FileNotFoundError for a relative path,
    and :data:`DISK_HINT` under a write that found no space.

    IPython 9 no longer passes runtime errors to ``set_custom_exc`` handlers,
    so the shell's ``_showtraceback`` (which publishes the error and keeps
    the traceback for the reply) gets the line added.
    """
    show = shell._showtraceback
    limit = os.environ.pop(DISK_VAR, None)

    def show_with_hint(etype: Any, evalue: BaseException, stb: list[str]) -> Any:
        hint = file_not_found_hint(evalue) or disk_full_hint(evalue, limit)
        return show(etype, evalue, list(stb) + [hint] if hint else stb)

    shell._showtraceback = show_with_hint
