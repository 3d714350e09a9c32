"""A session's life: the handshake, the lease, parking, the end.

A client says :class:`Hello` and is welcomed (:class:`Welcome`); a
:class:`LeaseRequest` waits in the queue (:class:`QueuePosition`) until it
is granted (:class:`LeaseGranted`). :class:`Park` saves the session on the
server's disk and gives its slots back (:class:`Parked`), :class:`Resume`
restores it; :class:`Release` ends it, and :class:`Released` says that it
ended, for any reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Message, MessageType

__all__ = [
    "ENV_FIELD", "Hello", "LeaseGranted", "LeaseRequest", "Park", "Parked", "QueuePosition", "Release",
    "Released", "Resume", "Welcome",
]

#: The field of a lease request that names its environment (see :class:`LeaseRequest`).
ENV_FIELD = "env"


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    type = MessageType.HELLO
    protocol: int
    client: str = ""


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    """``limits``: what the server takes, in bytes, so that a client can refuse
    a message before sending it: ``max_push`` (a push's buffers),
    ``max_upload`` (an upload's files) and ``max_message`` (any other
    message, header and buffers); empty from a server that names none.
    ``envs``: the versions of each of the server's named environments (see
    :mod:`remote_gpu_core.fingerprint`), so that a lease notice can name one
    that matches the notebook; empty where it has only its own Python."""

    type = MessageType.WELCOME
    protocol: int
    server: str
    user: str
    limits: dict[str, int] = dataclasses.field(default_factory=dict)
    envs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LeaseRequest(Message):
    """Ask for a lease of ``gpus`` slots, or to resume session ``resume``.

    ``priority`` is ``high``, ``normal`` or ``low``; ``pool`` names a pool
    of slots configured on the server (``default``: the unnamed slots).
    ``notebook`` is the path of the notebook the lease is for, as Jupyter
    gives it to the kernel (``JPY_SESSION_NAME``), or None (a script); the
    server shows it to the lease's owner only. ``env`` names the Python
    environment its worker runs (``default``: the server's own).

    Versions: ``env`` is left out of the header when it is ``default``, so
    that a server older than environments takes the request; such a server
    refuses one that names another environment with a protocol error about
    the field ``env`` (see :data:`ENV_FIELD`), which a client turns into
    "this server has no named environments".
    """

    type = MessageType.LEASE_REQUEST
    req: int
    gpus: int = 1
    resume: str | None = None
    priority: str = "normal"
    pool: str = "default"
    notebook: str | None = None
    env: str = "default"

    def fields(self) -> dict[str, Any]:
        fields = super().fields()
        if self.env == "default":
            del fields["env"]
        return fields


@dataclasses.dataclass(frozen=True)
class QueuePosition(Message):
    """The lease request ``req`` waits; ``position`` 1 is next in line."""

    type = MessageType.QUEUE_POSITION
    req: int
    position: int


@dataclasses.dataclass(frozen=True)
class LeaseGranted(Message):
    """``parked``: the session resumed by id is parked; it holds no slot
    (``slots`` are the ones it had) until its next request restores it.
    ``fingerprint``: the versions of Python and of the packages that cross
    most in the session's environment, as its worker reported them (see
    :mod:`remote_gpu_core.fingerprint`), for the client to compare with its own."""

    type = MessageType.LEASE_GRANTED
    omitted_while_empty = ("parked",)  # what a client from before parking can read
    req: int
    session: str
    slots: list[str]
    resumed: bool = False
    waited: float = 0.0
    language_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    parked: bool = False
    fingerprint: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Release(Message):
    type = MessageType.RELEASE
    req: int


@dataclasses.dataclass(frozen=True)
class Released(Message):
    """The session's lease ended; ``reason`` says why."""

    type = MessageType.RELEASED
    req: int
    session: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Park(Message):
    """Save the session's namespace to disk on the GPU machine and give its slots back.

    The session stays, holding no slot; answered with :class:`Parked`, or an
    :class:`Error` (``PARK_REFUSED``: nothing changed, the session goes on).
    """

    type = MessageType.PARK
    req: int


@dataclasses.dataclass(frozen=True)
class Parked(Message):
    """Session ``session`` is parked: ``names`` were saved (in ``seconds``),
    ``unsaved`` maps each name that could not be saved to why, ``nbytes`` is
    what the parked session holds on the server's disk (its session folder,
    the saved namespace in it), ``reason`` says why it was parked, and
    ``text`` says it all in one line for the user."""

    type = MessageType.PARKED
    req: int
    session: str
    names: list[str]
    unsaved: dict[str, Any]
    nbytes: int
    seconds: float
    reason: str
    text: str


@dataclasses.dataclass(frozen=True)
class Resume(Message):
    """Restore a parked session now rather than at its next request."""

    type = MessageType.RESUME
    req: int
