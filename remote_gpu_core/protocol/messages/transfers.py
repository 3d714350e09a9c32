"""Variables and files that move between the notebook and the worker.

:class:`Push` sets variables in the remote namespace and :class:`Pull`
fetches them (pickles and their out-of-band buffers, see
:mod:`remote_gpu_core.protocol.serialization`); :class:`Upload` writes
files into the session's folder on the server and :class:`Download` reads
them. Their payloads travel as buffers beside the JSON header, never
inside it.

Large buffers are named by content (see
:mod:`remote_gpu_core.protocol.content`): ``digests`` has one entry per
buffer of the value list (``""`` for a small one), and ``cached`` the
indices of those left out of ``buffers`` because the receiver holds them.
Of the buffers carried, the ``compressed`` ones (indices into ``buffers``)
are one frame each of ``codec``, ``raw_sizes`` bytes before (see
:mod:`remote_gpu_core.protocol.compression`); a pull names the ``codecs``
its answer may use.
"""

from __future__ import annotations

import dataclasses

from .base import Buffers, Message, MessageType

__all__ = [
    "Download", "DownloadReply", "Pull", "PullReply", "Push", "PushDone", "Upload",
    "UploadDone",
]


@dataclasses.dataclass(frozen=True)
class Push(Message):
    """Variables to set in the remote namespace.

    ``counts[i]`` buffers belong to ``names[i]``: a pickle first, then its
    out-of-band buffers (see :mod:`.serialization`). ``buffers`` carries
    them all but the ``cached`` ones, which the worker is asked to take from
    what it holds by their ``digests``.
    """

    type = MessageType.PUSH
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()
    digests: list[str] = dataclasses.field(default_factory=list)
    cached: list[int] = dataclasses.field(default_factory=list)
    codec: str = ""
    compressed: list[int] = dataclasses.field(default_factory=list)
    raw_sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PushDone(Message):
    """The variables were set; or, when ``missing`` names digests the worker
    no longer held, nothing was set: push again with their bytes."""

    type = MessageType.PUSH_DONE
    req: int
    names: list[str]
    missing: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Pull(Message):
    """Variables to fetch; ``have``: digests of buffers the client holds, which
    the answer names instead of carrying."""

    type = MessageType.PULL
    req: int
    names: list[str]
    have: list[str] = dataclasses.field(default_factory=list)
    codecs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class PullReply(Message):
    """As :class:`Push`, the other way: the ``cached`` buffers are the client's own."""

    type = MessageType.PULL_REPLY
    req: int
    names: list[str]
    counts: list[int]
    buffers: Buffers = ()
    digests: list[str] = dataclasses.field(default_factory=list)
    cached: list[int] = dataclasses.field(default_factory=list)
    codec: str = ""
    compressed: list[int] = dataclasses.field(default_factory=list)
    raw_sizes: list[int] = dataclasses.field(default_factory=list)


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
