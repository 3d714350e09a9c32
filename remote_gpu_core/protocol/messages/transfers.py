"""Variables and files that move between the notebook and the worker.

:class:`Push` sets variables in the remote namespace and :class:`Pull`
fetches them (pickles and their out-of-band buffers, see
:mod:`remote_gpu_core.protocol.serialization`); :class:`Upload` writes
files into the session's folder on the server and :class:`Download` reads
them. Their payloads travel as buffers beside the JSON header, never
inside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Buffers, Message, MessageType

__all__ = [
    "Download", "DownloadReply", "Pull", "PullReply", "Push", "PushDone", "Upload",
    "UploadDone",
]


@dataclasses.dataclass(frozen=True)
class Push(Message):
    """Variables to set in the remote namespace.

    ``counts[i]`` buffers belong to ``names[i]``: a pickle first, then its
    out-of-band buffers (see :mod:`.serialization`).
    """

    type = MessageType.PUSH
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class PushDone(Message):
    type = MessageType.PUSH_DONE
    req: int
    names: list[str]


@dataclasses.dataclass(frozen=True)
class Pull(Message):
    """The values of remote variables. ``after``, where not 0: pull only if
    that earlier request (the cell that makes them) succeeded, as in
    :class:`~.cells.Execute`; else the answer is ``ErrorCode.NOT_RUN``."""

    type = MessageType.PULL
    req: int
    names: list[str]
    after: int = 0

    def fields(self) -> dict[str, Any]:
        fields = super().fields()
        if not self.after:  # the message as it was before the field
            del fields["after"]
        return fields


@dataclasses.dataclass(frozen=True)
class PullReply(Message):
    type = MessageType.PULL_REPLY
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class Upload(Message):
    """Files to write into the session's folder on the server.

    ``paths[i]`` is relative to that folder (no ``..``, not absolute) and
    ``buffers[i]`` is its content. The server refuses the whole upload when
    it is over its limit (``max_upload`` in :attr:`Welcome.limits`).
    """

    type = MessageType.UPLOAD
    req: int
    paths: list[str]
    buffers: Buffers = ()


@dataclasses.dataclass(frozen=True)
class UploadDone(Message):
    """``sizes[i]`` bytes were written to ``paths[i]``."""

    type = MessageType.UPLOAD_DONE
    req: int
    paths: list[str]
    sizes: list[int]


@dataclasses.dataclass(frozen=True)
class Download(Message):
    """Files to read from the session's folder, relative to it."""

    type = MessageType.DOWNLOAD
    req: int
    paths: list[str]


@dataclasses.dataclass(frozen=True)
class DownloadReply(Message):
    """``buffers[i]`` is the content of ``paths[i]``."""

    type = MessageType.DOWNLOAD_REPLY
    req: int
    paths: list[str]
    buffers: Buffers = ()
