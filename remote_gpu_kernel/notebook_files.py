"""The notebook's folder, served on demand to the cells it runs remotely: the local side.

A remote cell that opens ``data.csv`` which its session's folder on the
GPU server lacks makes the server ask this client for it
(:class:`~remote_gpu_core.protocol.messages.Fetch`); :class:`NotebookFolder`
says what may be sent. Only files of the notebook's folder, read-only:

- the path is relative, with no ``..`` and no hidden part (a name that
  starts with ``.``: ``.ssh``, ``.env``, ``.git``);
- after symbolic links it is still inside the folder, and the file is
  opened with ``O_NOFOLLOW`` at that real path;
- it is a regular file (not a folder, a fifo, a socket or a device) of at
  most ``max_size`` bytes.

The notebook's folder is the folder of the notebook (``JPY_SESSION_NAME``
where Jupyter gives its full path), else the working folder, which is the
notebook's for a kernel Jupyter started. ``RGPU_FETCH=0`` (or ``off``,
``no``, ``false``) turns fetching off; ``RGPU_FETCH_MAX`` (a size, like
``200M``; default 1 GiB) sets the largest file sent. No network here:
:class:`~remote_gpu_kernel.session.AsyncSession` answers with these.

A file sent stays in the session's folder for later opens. When it then
changes here (its size, modification time or inode), or goes, the next
cell's request names it (:func:`fetching`) and the worker drops its copy,
where the cell left it as it came, so that the next open fetches it again:
edit ``data.csv`` beside the notebook, run the cell again, and it reads
the new one.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from remote_gpu_core.errors import FetchRefused
from remote_gpu_core.protocol import messages as m
from remote_gpu_core.sizes import format_size, parse_size

from . import files as _files

if TYPE_CHECKING:
    from .link import Link

__all__ = ["DEFAULT_MAX_SIZE", "NotebookFolder", "fetched_note", "fetching", "folder_for", "serve_fetch"]

#: The largest file sent unless ``RGPU_FETCH_MAX`` or ``max_size`` says otherwise.
DEFAULT_MAX_SIZE = 1 << 30
_OFF = ("0", "off", "no", "false")


def fetched_note(name: str, size: int) -> str:
    """The line the cell shows for a file fetched."""
    return f"fetched {name}, {format_size(size)}, from your notebook's folder"


@dataclasses.dataclass(frozen=True)
class NotebookFolder:
    """The folder files are sent from (``root``) and the largest file sent."""

    root: Path
    max_size: int = DEFAULT_MAX_SIZE
    #: The files sent, by the name the worker asked: their size, modification time and inode then.
    served: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_environ(cls, notebook: str | None = None) -> NotebookFolder | None:
        """The notebook's folder (see the module docstring); None when
        ``RGPU_FETCH`` turns fetching off. Raises ValueError for a
        ``RGPU_FETCH_MAX`` that is not a size."""
        if (os.environ.get("RGPU_FETCH") or "").strip().lower() in _OFF:
            return None
        return cls.here(notebook)

    @classmethod
    def here(cls, notebook: str | None = None) -> NotebookFolder:
        """The notebook's folder, whatever ``RGPU_FETCH`` says (``%gpu fetch on``)."""
        limit = os.environ.get("RGPU_FETCH_MAX")
        max_size = DEFAULT_MAX_SIZE if not limit else parse_size(limit, minimum=1, what="RGPU_FETCH_MAX")
        assert max_size is not None
        root = Path.cwd()
        if notebook and os.path.isabs(notebook) and os.path.isdir(os.path.dirname(notebook)):
            root = Path(os.path.dirname(notebook))
        return cls(root, max_size)

    def open(self, name: str, limit: int = 0) -> tuple[Any, int]:
        """A read-only map of file ``name`` (b"" when empty) and its size; close it
        after sending. ``limit`` (not 0): the server's own largest upload.

        Raises :class:`~remote_gpu_core.errors.FetchRefused`: ``refusal``
        ``missing`` for no such file, ``refused`` for one that is not sent
        (see the module docstring).
        """
        real = self._resolve(name)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FetchRefused(f"no file {name!r} in your notebook's folder ({self.root})",
                               m.FetchRefusal.MISSING.value) from None
        except OSError as exc:
            raise FetchRefused(f"{name!r} cannot be read in your notebook's folder: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._refused(f"{name!r} is not a regular file (a folder, a fifo, a socket or a "
                                    "device): only files are sent")
            most = min(self.max_size, limit) if limit else self.max_size
            if info.st_size > most:
                which = ("the GPU server's upload limit" if limit and limit < self.max_size
                         else "the limit of files sent from your notebook's folder (RGPU_FETCH_MAX)")
                raise self._refused(f"{name!r} is {format_size(info.st_size)}, over {which} of "
                                    f"{format_size(most)}: send it with %gpu upload, or raise the limit")
            data: Any = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if info.st_size else b""
            self.served[name] = _stamp(info)
            return data, info.st_size
        finally:
            os.close(fd)

    def changed(self) -> list[str]:
        """The files sent that changed here since (or are gone), forgotten: the
        worker's copies of them are stale (:attr:`~m.Execute.refetch`). A
        ``stat`` per file sent, once per cell."""
        stale = []
        for name, stamp in list(self.served.items()):
            try:
                now: tuple[int, int, int] | None = _stamp(os.stat(self._resolve(name)))
            except (OSError, FetchRefused):
                now = None
            if now != stamp:
                stale.append(name)
                del self.served[name]
        return stale

    def _refused(self, message: str) -> FetchRefused:
        return FetchRefused(message, m.FetchRefusal.REFUSED.value)

    def _resolve(self, name: str) -> str:
        """The real path of ``name`` inside the folder, or a refusal that says why."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise self._refused(f"{name!r} is not a file name")
        pure = PurePosixPath(name)
        where = f"only files in your notebook's folder ({self.root}) are sent"
        if pure.is_absolute():
            raise self._refused(f"{name!r} is an absolute path: {where}")
        if ".." in pure.parts:
            raise self._refused(f"{name!r} goes up with '..': {where}")
        if any(part.startswith(".") for part in pure.parts):
            raise self._refused(f"{name!r} is hidden (a name that starts with '.'): hidden files and "
                                "folders are not sent; use %gpu upload")
        root = os.path.realpath(self.root)
        real = os.path.realpath(os.path.join(root, *pure.parts))
        if real != root and not real.startswith(root + os.sep):
            raise self._refused(f"{name!r} leads out of your notebook's folder through a symbolic link: {where}")
        return real


def _stamp(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ino


def fetching(folder: NotebookFolder | None) -> dict[str, Any]:
    """The fields of a cell's :class:`~m.Execute` about the notebook's files:
    whether ``folder`` serves them, and which it sent that changed since."""
    return {"fetch": folder is not None, "refetch": folder.changed() if folder is not None else []}


def folder_for(fetch: bool | None, notebook: str | None) -> NotebookFolder | None:
    """What a session serves: ``fetch`` is the user's ``%gpu fetch on|off``, or
    None where the environment decides (see the module docstring)."""
    if fetch is None:
        return NotebookFolder.from_environ(notebook)
    return NotebookFolder.here(notebook) if fetch else None


async def serve_fetch(link: Link, folder: NotebookFolder | None, max_upload: int, msg: m.Fetch,
                      on_fetched: Callable[[str], Any] | None) -> None:
    """Send the file a running cell opened (``msg``) from ``folder``, or say why
    not; the server answers neither. ``on_fetched`` hears the one-line note."""
    from .results import notify

    req, _ = link.open()  # an id of its own: whatever the server says to it is dropped
    try:
        if folder is None:
            raise FetchRefused("fetching files of the notebook's folder is off", m.FetchRefusal.OFF.value)
        data, size = folder.open(msg.path, max_upload)
    except FetchRefused as exc:
        link.done(req)
        await link.send(m.FetchRefused(req, msg.fetch, exc.refusal, str(exc)))
        return
    try:
        await link.send(m.Upload(req, [msg.path], (data,), fetch=msg.fetch))
    finally:
        link.done(req)
        _files.close_all([data])
    notify(on_fetched, fetched_note(msg.path, size))
