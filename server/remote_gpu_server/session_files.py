"""Files moved in and out of a session's folder on the GPU machine.

Each lease has a folder of its own (see :mod:`.isolation`: ``--session-root``),
made when the lease is granted and removed when it ends; the worker enters
it at lease time and works in it, and a fresh worker after one died enters
the same folder, so files outlive a worker's crash but not the session.

:func:`upload` and :func:`download` serve the protocol's :class:`~m.Upload`
and :class:`~m.Download`: file contents stream through the worker's data
channel like pushed and pulled variables, never inside JSON, and the worker
checks every path against the folder (see :mod:`.worker_files`). An upload
over ``--max-upload`` bytes is refused as it arrives (see :mod:`.limits`).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from remote_gpu_kernel.errors import WorkerDied
from remote_gpu_kernel.protocol import messages as m
from remote_gpu_kernel.protocol.framing import Chunks

from .worker import TransferAborted

if TYPE_CHECKING:
    from .session import Replier, Session

__all__ = ["download", "upload"]

log = logging.getLogger("remote_gpu_server")


def _drain(buffers: tuple[Any, ...], reason: str) -> None:
    """Drop the pieces of an upload that is refused, now and as they arrive."""
    for buf in buffers:
        if isinstance(buf, Chunks):
            buf.fail(reason)


async def upload(session: Session, msg: m.Upload, conn: Replier) -> None:
    """Write the uploaded files into the session's folder; answer UploadDone or Error."""
    if len(msg.paths) != len(msg.buffers):
        _drain(msg.buffers, "refused: paths and files do not match")
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, "upload: paths and files do not match"))
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
