"""The Remote GPU kernel's hold on its GPU: lease lazily, resume after drops.

:class:`RemoteLease` keeps at most one :class:`AsyncSession`. The first
cell that needs the GPU calls :meth:`RemoteLease.acquire`, which leases one
and, while the request waits in the server's queue, reports the position
through a :class:`LeaseReporter`. Afterwards :meth:`acquire` hands back the
same session, and when its connection dropped it reconnects with
``resume=<session id>``: the server gives the same worker and variables back
within its grace period, or says that the session is gone (a notice) and a
new one is leased. What a session's worker publishes outside any request
goes to ``on_background``. A session the server released (idle timeout) is replaced
the same way. All methods run on the kernel's main event loop.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from collections.abc import Callable

from remote_gpu_core.errors import AuthenticationError
from remote_gpu_core.login import notebook_path
from remote_gpu_core.protocol.messages import Output

from ..client import AsyncClient
from ..notebook_files import folder_for
from ..session import AsyncSession

__all__ = ["LeaseReporter", "RemoteLease"]

log = logging.getLogger("remote_gpu_kernel")


class LeaseReporter(Protocol):
    """Where :meth:`RemoteLease.acquire` tells the cell what happens."""

    def queued(self, position: int) -> None: ...

    def granted(self, session: AsyncSession, url: str) -> None: ...

    def resumed(self, session: AsyncSession, url: str) -> None: ...

    def notice(self, text: str) -> None: ...

    def missed(self, outputs: list[Output]) -> None: ...


class RemoteLease:
    """The kernel's current session, if any; see the module docstring."""

    def __init__(self, url: str | None = None, token: str | None = None,
                 on_background: Callable[[Output], None] | None = None) -> None:
        self._url = url
        self._token = token
        self._on_background = on_background
        self._client: AsyncClient | None = None
        self.session: AsyncSession | None = None
        #: ``%gpu fetch on|off``; None: RGPU_FETCH decides (see :mod:`..notebook_files`).
        self.fetch: bool | None = None

    @property
    def client(self) -> AsyncClient:
        """The client, made on first use (it reads RGPU_URL/RGPU_TOKEN then)."""
        if self._client is None:
            self._client = AsyncClient(self._url, self._token)
        return self._client

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def usable(self) -> AsyncSession | None:
        """The session if it is leased and connected now; never leases."""
        session = self.session
        if session is not None and session.connected and not session.released:
            return session
        return None

    @property
    def language_info(self) -> dict[str, Any]:
        return dict(self.session.language_info) if self.session is not None else {}

    async def acquire(self, report: LeaseReporter) -> AsyncSession:
        """The leased session, leasing or reconnecting first where needed.

        Raises what :meth:`AsyncClient.open_session` raises: ConnectionLost
        when the server cannot be reached, AuthenticationError without a
        valid token, LeaseError when no lease can be granted. Cancelling it
        while it waits in the queue withdraws the request.
        """
        session = self.session
        if session is not None and session.released:
            report.notice(f"The GPU session was released ({session.released}): leasing a new one; "
                          "the variables of the old one are gone.")
            await self._drop()
            session = None
        if session is not None and not session.connected:
            old, seen = session.id, session.last_seq
            await self._drop()
            fresh = await self._open(report, resume=old)
            if fresh.resumed:
                report.resumed(fresh, self.url)
                missed = await fresh.replay(seen)  # waits for a cell still running from before
                if missed:
                    report.missed(missed)
            else:
                report.granted(fresh, self.url)
            return fresh
        if session is None:
            session = await self._open(report)
            report.granted(session, self.url)
        return session

    async def _open(self, report: LeaseReporter, resume: str | None = None) -> AsyncSession:
        client = self.client
        if not client.token:
            raise AuthenticationError(
                f"no token for the GPU server at {client.url}: set RGPU_TOKEN in the kernel's "
                "environment or run 'rgpu login URL TOKEN', then run the cell again"
            )
        self.session = await client.open_session(resume=resume, on_queue=report.queued,
                                                 on_notice=report.notice, notebook=notebook_path(),
                                                 say_mismatch=False)
        self.session.on_background = self._on_background
        if self.fetch is not None:
            self.session.notebook_files = folder_for(self.fetch, notebook_path())
        return self.session

    def set_fetch(self, fetch: bool) -> None:
        """``%gpu fetch on|off``: for the session now and those after it."""
        self.fetch = fetch
        if self.session is not None:
            self.session.notebook_files = folder_for(fetch, notebook_path())

    async def _drop(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            try:
                await session.close()
            except Exception:
                log.debug("closing a dead session's connection failed", exc_info=True)

    async def release(self) -> None:
        """Give the GPU back (the worker and its variables go); safe to call twice."""
        session, self.session = self.session, None
        if session is not None:
            await session.release()
