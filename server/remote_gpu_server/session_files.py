"""A session's folder on the GPU machine, and files moved in and out of it.

Each session gets a folder of its own under the server's work directory
(``rgpu serve --work-dir``; by default a private temporary folder), made
when the lease is granted and removed when it ends. The session's worker
runs in it: the server names it to the worker with a ``chdir`` operation
on the variable-transfer comm, and again to a fresh worker after one died,
so files outlive a worker's crash but not the session.

:func:`upload` and :func:`download` serve the protocol's :class:`~m.Upload`
and :class:`~m.Download`: file contents stream through the worker's data
channel like pushed and pulled variables, never inside JSON, and the worker
checks every path against the folder (see :mod:`.worker_files`). An upload
over ``max_upload`` bytes is refused before anything reaches the worker.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remote_gpu_kernel.errors import WorkerDied
from remote_gpu_kernel.files import format_size
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.protocol.framing import Chunks

from .worker import TransferAborted, Worker

if TYPE_CHECKING:
    from .session import Replier, Session

__all__ = ["Folders", "download", "enter", "upload"]

log = logging.getLogger("remote_gpu_server")


class Folders:
    """Session folders under ``root`` (None: a private temporary folder,
    removed by :meth:`close`)."""

    def __init__(self, root: Path | None = None) -> None:
        self._owned = root is None
        self.root = Path(tempfile.mkdtemp(prefix="rgpu-sessions-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def create(self, session_id: str) -> Path:
        path = self.root / session_id
        path.mkdir(mode=0o700)
        return path

    def remove(self, path: Path | None) -> None:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


async def enter(worker: Worker, folder: Path) -> None:
    """Make ``folder`` the worker's working folder and the root of its file transfers."""
    try:
        reply = await worker.op({"op": "chdir", "path": str(folder)})
    except WorkerDied:
        return  # the session learns it at its next request
    if not reply.get("ok"):
        log.warning("worker %s could not enter %s: %s: %s", worker.name, folder,
                    reply.get("ename"), reply.get("evalue"))


def _drain(buffers: tuple[Any, ...]) -> None:
    """Drop the pieces of an upload that is refused, now and as they arrive."""
    for buf in buffers:
        if isinstance(buf, Chunks):
            def drop(chunks: Chunks = buf) -> None:
                chunks.parts.clear()

            buf.listener = drop
            drop()


async def upload(session: Session, msg: m.Upload, conn: Replier, max_upload: int) -> None:
    """Write the uploaded files into the session's folder; answer UploadDone or Error."""
    total = sum(len(b) for b in msg.buffers)
    if len(msg.paths) != len(msg.buffers):
        _drain(msg.buffers)
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, "upload: paths and files do not match"))
        return
    if max_upload and total > max_upload:
        _drain(msg.buffers)
        await conn.send(m.Error(msg.req, m.ErrorCode.FILE, (
            f"the upload of {format_size(total)} is over this server's limit of "
            f"{format_size(max_upload)} per upload (rgpu serve --max-upload); nothing was written")))
        return
    async with session.lock:
        worker = await session.prepare(msg.req, conn)
        try:
            reply = await worker.send_buffers({"op": "upload", "paths": list(msg.paths)}, list(msg.buffers))
        except WorkerDied as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
            return
        except TransferAborted as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.PROTOCOL, f"upload cut short: {exc}"))
            return
        if not reply.get("ok"):
            await conn.send(m.Error(msg.req, m.ErrorCode.FILE, f"{reply.get('ename')}: {reply.get('evalue')}"))
            return
        await conn.send(m.UploadDone(msg.req, list(reply["paths"]), list(reply["sizes"])))


async def download(session: Session, msg: m.Download, conn: Replier) -> None:
    """Send the files of the session's folder that ``msg`` names; DownloadReply or Error."""
    async with session.lock:
        worker = await session.prepare(msg.req, conn)
        try:
            reply, pieces = await worker.receive_buffers({"op": "download", "paths": list(msg.paths)})
        except WorkerDied as exc:
            await conn.send(m.Error(msg.req, m.ErrorCode.WORKER_DIED, str(exc)))
            return
        if pieces is None:
            await conn.send(m.Error(msg.req, m.ErrorCode.FILE, f"{reply.get('ename')}: {reply.get('evalue')}"))
            return
        async with aclosing(pieces):  # the worker is done with the ring before the next request
            await conn.send_stream(m.DownloadReply(msg.req, list(reply["paths"])), list(reply["sizes"]), pieces)
