"""The asyncio client: one websocket per session.

    async with AsyncClient(url, token).session(gpus=1) as session:
        await session.push(x=x)
        result = await session.execute("y = x * 2; print(y.sum())")
        y = (await session.pull("y"))["y"]

:mod:`remote_gpu_kernel.sync` wraps this for code that is not async (the
magic, scripts). Errors a cell raises come back in
:attr:`ExecuteResult.error`; errors of the service (the worker died, the
lease ended, the connection dropped) raise.

:class:`AsyncClient` opens sessions; the connection is :mod:`.link`'s and a
session's requests are :mod:`.session`'s, whose public names are
re-exported here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from remote_gpu_core.errors import LeaseError, ProtocolError
from remote_gpu_core.fingerprint import local_fingerprint
from remote_gpu_core.login import ClientConfig
from remote_gpu_core.protocol import messages as m

from . import notices
from .buffers import CutPull
from .link import FIRST_REQ, connect_link
from .notebook_files import NotebookFolder
from .session import (
    AsyncSession, ExecuteResult, NoticeCallback, QueueCallback, notify, parent_of, write_streams
)

__all__ = ["AsyncClient", "AsyncSession", "ExecuteResult", "SessionOpener", "no_environments", "parent_of",
           "write_streams"]


class AsyncClient:
    """Where the server is and who we are; opens sessions.

    ``url`` and ``token`` default to ``RGPU_URL`` / ``RGPU_TOKEN``, then to
    the client config file (see :mod:`remote_gpu_core.login`). A
    ``wss://`` server's certificate is verified against the system's CAs and
    ``cafile`` (default ``RGPU_CA``); the token is never sent over plain
    ``ws://`` to a host other than loopback unless ``insecure`` (default
    ``RGPU_INSECURE``), see :mod:`remote_gpu_core.tls`.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 open_timeout: float = 10, cafile: str | None = None,
                 insecure: bool | None = None) -> None:
        config = ClientConfig.load(url, token, cafile=cafile, insecure=insecure)
        self.config = config
        self.url = config.url
        self.token = config.token
        self.open_timeout = open_timeout
        self.user: str | None = None
        self.server_version: str | None = None
        #: What came of the latest pull cut short by a dropped connection, by
        #: session: the session resumed on this client offers it (see :mod:`.buffers`).
        self.cut_pulls: dict[str, CutPull] = {}

    def session(self, gpus: int | None = None, *, resume: str | None = None,
                priority: str | None = None, pool: str | None = None,
                on_queue: QueueCallback | None = None,
                on_notice: NoticeCallback | None = None,
                notebook: str | None = None, say_mismatch: bool = True,
                env: str | None = None) -> SessionOpener:
        """Lease ``gpus`` slots: ``await`` it, or use it as ``async with``."""
        return SessionOpener(self.open_session(gpus, resume=resume, priority=priority, pool=pool,
                                                on_queue=on_queue, on_notice=on_notice,
                                                notebook=notebook, say_mismatch=say_mismatch, env=env))

    async def open_session(self, gpus: int | None = None, *, resume: str | None = None,
                           priority: str | None = None, pool: str | None = None,
                           on_queue: QueueCallback | None = None,
                           on_notice: NoticeCallback | None = None,
                           notebook: str | None = None, say_mismatch: bool = True,
                           env: str | None = None) -> AsyncSession:
        """Lease ``gpus`` slots of ``pool`` at ``priority``, or resume a session.

        Unset arguments come from the client's config (RGPU_GPUS,
        RGPU_PRIORITY, RGPU_POOL, RGPU_ENV): 1 slot, ``normal``, ``default``,
        ``default``. ``env`` names the Python environment of the worker (the
        server lists them: ``rgpu envs``); an unknown one raises LeaseError
        naming those the server has.
        ``on_queue(position)`` is called whenever the request's place in the
        queue changes. ``notebook`` is the path of the notebook the lease is
        for, shown to its owner in the sidebar and ``/api/status`` (the magic
        and the kernel pass Jupyter's; a script passes none). Its folder (else
        the working folder) is the one the session's cells fetch missing files
        from (:attr:`AsyncSession.notebook_files`; ``RGPU_FETCH=0`` turns that off).
        Where the worker's versions of Python and of the packages that cross
        most differ from this Python's, a new session says so in one line
        through ``on_notice`` (:attr:`AsyncSession.mismatch`); the magic and
        the kernel pass ``say_mismatch=False`` and show it in their lease line.
        """
        files = NotebookFolder.from_environ(notebook)
        # This Python's versions, read once per process while the lease is on its way.
        versions = asyncio.ensure_future(
            asyncio.to_thread(local_fingerprint) if not local_fingerprint.cache_info().currsize
            else asyncio.sleep(0))
        try:
            # The lease request goes with the hello, in the websocket upgrade
            # request: the welcome and the lease come back right behind its answer.
            link, inbox = await connect_link(
                self.url, self.token, cafile=self.config.cafile, insecure=self.config.insecure,
                open_timeout=self.open_timeout,
                first=lambda req: m.LeaseRequest(req, gpus or self.config.gpus, resume,
                                                 priority or self.config.priority, pool or self.config.pool,
                                                 notebook, env or self.config.env))
        except BaseException:
            versions.cancel()
            raise
        assert inbox is not None
        try:
            await link.welcomed()
            self.user, self.server_version = link.user, link.server_version
            while True:
                try:
                    msg = await link.receive(inbox)
                except ProtocolError as exc:
                    raise no_environments(exc, env or self.config.env, self.server_version) from None
                if isinstance(msg, m.QueuePosition):
                    if on_queue is not None:
                        on_queue(msg.position)
                elif isinstance(msg, m.Notice):
                    notify(on_notice, msg.text)
                elif isinstance(msg, m.LeaseGranted):
                    link.done(FIRST_REQ)
                    await versions
                    session = AsyncSession(link, msg, on_notice)
                    session.notebook_files = files
                    session.cut_pulls = self.cut_pulls
                    link.on_cut = lambda fields, came: self._cut(session.id, fields, came)
                    if say_mismatch and session.mismatch and not session.resumed:
                        notify(on_notice, notices.versions_differ(session.mismatch))
                    return session
        except BaseException:
            versions.cancel()
            await link.close()
            raise

    def _cut(self, session: str, fields: dict[str, Any], came: list[tuple[Any, int]]) -> None:
        if fields.get("t") == m.MessageType.PULL_REPLY.value:
            cut = CutPull(fields, came)
            self.cut_pulls.clear()  # only the latest
            if cut.parts:
                self.cut_pulls[session] = cut


def no_environments(exc: ProtocolError, env: str, server_version: str | None) -> Exception:
    """What a lease in ``env`` that the server refused with ``exc`` means: a server
    older than named environments refuses the request's ``env`` field."""
    if env == "default" or f"'{m.ENV_FIELD}'" not in str(exc):
        return exc
    return LeaseError(f"the GPU server (version {server_version or 'unknown'}) has no named environments, so it "
                      f"cannot run environment {env!r}: leave the environment out to use its own Python, "
                      "or ask its admin to upgrade it", code="lease_refused")


class SessionOpener:
    """What :meth:`AsyncClient.session` returns: ``await`` it for the session,
    or use it as ``async with`` to release the session at the end."""

    def __init__(self, opening: Coroutine[Any, Any, AsyncSession]) -> None:
        self._opening = opening
        self._session: AsyncSession | None = None

    def __await__(self) -> Any:
        return self._opening.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._opening
        return self._session

    async def __aexit__(self, *exc: Any) -> None:
        if self._session is not None:
            await self._session.release()
