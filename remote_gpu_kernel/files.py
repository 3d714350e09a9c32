"""Files between this machine and the session's folder on the GPU server: the local side.

``%gpu upload PATH...`` sends files so that a remote cell opens them by the
same relative path as a local one would: ``images/x.png`` here becomes
``images/x.png`` in the session's folder. A folder stands for the files
under it, less JupyterLab's ``.ipynb_checkpoints`` folders (its own copies
of notebooks, not data; naming one uploads it). A path that is absolute or
goes up with ``..`` keeps only its last part (``/data/train.csv`` becomes
``train.csv``). Contents are read through read-only memory maps and sent as
they are, never copied into a message. ``%gpu download PATH...`` writes each file by its path in the
session's folder, relative to this machine's working folder; a name from
the server that is absolute or goes up is refused, whoever sent it.

No network here: :class:`~remote_gpu_kernel.session.AsyncSession` does the
sending with these helpers.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path, PurePosixPath
from typing import Any

from remote_gpu_core.errors import FileTransferError
from remote_gpu_core.sizes import format_size

__all__ = ["LocalFile", "SKIPPED_FOLDERS", "plan_upload", "read_files", "remote_name",
           "write_files"]

#: Folders left out of a folder's upload (see the module docstring).
SKIPPED_FOLDERS = frozenset({".ipynb_checkpoints"})


@dataclasses.dataclass(frozen=True)
class LocalFile:
    """A file to upload: ``remote`` is its path in the session's folder."""

    local: Path
    remote: str
    size: int


def remote_name(path: str | os.PathLike[str]) -> str:
    """The path in the session's folder for local ``path`` (see the module docstring)."""
    text = os.fspath(path)
    norm = os.path.normpath(text)
    pure = PurePosixPath(norm.replace(os.sep, "/"))
    if os.path.isabs(text) or ".." in pure.parts or norm in (".", ""):
        name = os.path.basename(os.path.abspath(text))
        return name or "upload"
    return str(pure)


def plan_upload(paths: tuple[str | os.PathLike[str], ...], limit: int = 0) -> list[LocalFile]:
    """The files that ``paths`` name, with their remote paths and sizes.

    Raises FileTransferError naming the first path that is missing or is
    not a file or folder, or where the files are over ``limit`` bytes in
    all (the server's per-upload limit; 0: none), before anything is sent.
    """
    if not paths:
        raise FileTransferError("upload: name at least one file or folder")
    files: list[LocalFile] = []
    for path in paths:
        local = Path(path)
        if local.is_dir():
            base = "" if os.path.normpath(path) == "." else remote_name(local)
            for dirpath, dirnames, filenames in os.walk(local):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_FOLDERS)
                for name in sorted(filenames):
                    inner = Path(dirpath) / name
                    if inner.is_file():
                        rel = inner.relative_to(local).as_posix()
                        files.append(LocalFile(inner, f"{base}/{rel}" if base else rel,
                                               inner.stat().st_size))
        elif local.is_file():
            files.append(LocalFile(local, remote_name(local), local.stat().st_size))
        elif local.exists():
            raise FileTransferError(f"cannot upload {os.fspath(path)!r}: it is not a file or a folder")
        else:
            raise FileTransferError(f"cannot upload {os.fspath(path)!r}: no such file here "
                                    f"(in {os.getcwd()}); nothing was sent")
    total = sum(f.size for f in files)
    if limit and total > limit:
        raise FileTransferError(f"the upload of {format_size(total)} is over the GPU server's limit of "
                                f"{format_size(limit)} per upload; nothing was sent")
    return files


def read_files(files: list[LocalFile]) -> list[Any]:
    """Read-only memory maps of ``files`` (b"" for empty ones); close them after sending."""
    buffers: list[Any] = []
    try:
        for f in files:
            with open(f.local, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                buffers.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    except OSError as exc:
        close_all(buffers)
        raise FileTransferError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    return buffers


def close_all(buffers: list[Any]) -> None:
    for buf in buffers:
        try:
            if hasattr(buf, "close"):
                buf.close()
        except BufferError:
            pass  # still viewed by a frame being sent; it goes with the view


def write_files(names: list[str], buffers: tuple[Any, ...], into: Path | None = None) -> list[tuple[Path, int]]:
    """Write downloaded files under ``into`` (default: the working folder)."""
    root = Path.cwd() if into is None else into
    written: list[tuple[Path, int]] = []
    for name, data in zip(names, buffers):
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts:
            raise FileTransferError(f"the server sent a file named {name!r}, which is not a path "
                                    "inside this folder; it was not written")
        target = root.joinpath(*pure.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        view = memoryview(data).cast("B")
        with open(target, "wb") as handle:
            handle.write(view)
        written.append((target, view.nbytes))
    return written
