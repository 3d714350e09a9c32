"""A decoded JSON header back into its message, checked field by field.

:func:`message_from_fields` refuses, with a :class:`ProtocolError` that
says why, a header of an unknown type, with a field the message does not
have, without one it must have, or with a value that does not fit the
field's annotation.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, Union

from ...errors import ProtocolError
from .base import Buffers, Error, ErrorCode, Message, MessageType
from .cells import (
    Execute, ExecuteDone, Input, Interrupt, Notice, Output, Replay, ReplayDone, ShellReply, ShellRequest
)
from .session import (
    Hello, LeaseGranted, LeaseRequest, Park, Parked, QueuePosition, Release, Released, Resume, Welcome
)
from .transfers import (
    BulkOpen, BulkTicket, Download, DownloadReply, Fetch, FetchRefused, Held, Holding, Pull, PullReply, Push, PushDone, Upload,
    UploadDone,
)

__all__ = ["INT_MAX", "INT_MIN", "message_from_fields"]


_CLASSES: dict[MessageType, type[Message]] = {
    cls.type: cls
    for cls in (
        Hello, Welcome, LeaseRequest, QueuePosition, LeaseGranted, Execute,
        Output, Notice, ExecuteDone, Push, PushDone, Holding, Held, Pull, PullReply,
        ShellRequest, ShellReply, Upload, UploadDone, Download, DownloadReply, Input, Replay,
        ReplayDone, Interrupt, Release, Released, Park, Parked, Resume, Fetch, FetchRefused, Error,
        BulkOpen, BulkTicket,
    )
}  # fmt: skip


#: Integers in a message fit a signed 64-bit integer (a store's INTEGER).
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


def _check(value: Any, annotation: Any) -> bool:
    """Whether a decoded JSON value fits a field's annotation.

    Numbers must be finite (JSON decoders accept ``NaN`` and ``Infinity``)
    and integers must fit 64 bits, so that no field can carry a value that
    breaks arithmetic, a timer or a database query further on.
    """
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_check(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return INT_MIN <= value <= INT_MAX
        return isinstance(value, float) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and INT_MIN <= value <= INT_MAX
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_check(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _check(v, item) for k, v in value.items())
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation}
    return isinstance(annotation, type) and isinstance(value, annotation)


_HINTS: dict[type[Message], dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in _CLASSES.values()
}


def message_from_fields(fields: dict[str, Any], buffers: Buffers = ()) -> Message:
    """Build a message from its decoded JSON header; raise ProtocolError if off."""
    try:
        mtype = MessageType(fields.pop("t"))
    except (KeyError, ValueError, TypeError):
        raise ProtocolError(f"unknown message type {fields.get('t')!r}") from None
    cls = _CLASSES[mtype]
    hints = _HINTS[cls]
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in known or name == "buffers":
            raise ProtocolError(f"{mtype.value}: unexpected field {name!r}")
        if not _check(value, hints[name]):
            raise ProtocolError(f"{mtype.value}: field {name!r} has a bad value")
        kwargs[name] = value
    for name, f in known.items():
        if (
            name not in kwargs
            and name != "buffers"
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ProtocolError(f"{mtype.value}: missing field {name!r}")
    if cls is Error:
        kwargs["code"] = ErrorCode(kwargs["code"])
    if "buffers" in known:
        kwargs["buffers"] = tuple(buffers)
    elif buffers:
        raise ProtocolError(f"{mtype.value} carries no buffers")
    return cls(**kwargs)
