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

from typing import TYPE_CHECKING

from remote_gpu_core.protocol import messages as m

if TYPE_CHECKING:
    from .session import Replier, Session

__all__ = ["download", "upload"]


async def upload(session: Session, msg: m.Upload, conn: Replier) -> None:
    """Write the uploaded files into the session's folder; answer UploadDone or Error."""
    if len(msg.paths) != len(msg.buffers):
        await conn.send(m.Error(msg.req, m.ErrorCode.BAD_REQUEST, "upload: paths and files do not match"))
        return
    await session.send_in(msg.req, conn, {"op": "upload", "paths": list(msg.paths)}, list(msg.buffers),
                          "upload", lambda reply: m.ErrorCode.FILE,
                          lambda reply: m.UploadDone(msg.req, list(reply["paths"]), list(reply["sizes"])))


async def download(session: Session, msg: m.Download, conn: Replier) -> None:
    """Send the files of the session's folder that ``msg`` names; DownloadReply or Error."""
    await session.send_out(msg.req, conn, {"op": "download", "paths": list(msg.paths)},
                           lambda reply: m.ErrorCode.FILE,
                           lambda reply: m.DownloadReply(msg.req, list(reply["paths"])))
