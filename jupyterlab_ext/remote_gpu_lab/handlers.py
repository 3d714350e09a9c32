"""``/remote-gpu/...``: the sidebar's API, relayed to the GPU server.

Every handler is ``@tornado.web.authenticated`` (a Jupyter login is needed)
and answers JSON. A failure answers ``{"reason", "message", "hint", "url"}``
with a 4xx/5xx status and never a traceback. Upstream ``401`` becomes ``502``
with reason ``unauthorized``: ``401`` here would mean the Jupyter login
failed, not the GPU server's token.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from .gpu_api import GpuApi, GpuApiError

__all__ = ["setup_handlers"]

_ID = r"([A-Za-z0-9_.:-]+)"


class _RelayHandler(APIHandler):
    async def relay(self, call: Callable[[GpuApi], Awaitable[Any]], wrap: bool = False) -> None:
        api = GpuApi()
        try:
            result = await call(api)
        except GpuApiError as exc:
            self.set_status(exc.status)
            self.finish(json.dumps(exc.to_json(api.url)))
            return
        self.finish(json.dumps({"url": api.url, "status": result} if wrap else result))


class StatusHandler(_RelayHandler):
    """GET: ``{"url": <the configured server URL>, "status": <GET /api/status>}``."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.relay(lambda api: api.status(), wrap=True)


class JobsHandler(_RelayHandler):
    """GET: ``{"jobs": [the user's latest jobs], "total": how many (None: unknown)}`` (``GET /api/jobs``)."""

    @tornado.web.authenticated
    async def get(self) -> None:
        await self.relay(lambda api: api.jobs())


class CancelJobHandler(_RelayHandler):
    """POST: cancel one of the user's jobs."""

    @tornado.web.authenticated
    async def post(self, job_id: str) -> None:
        await self.relay(lambda api: api.cancel_job(job_id))


class ReleaseSessionHandler(_RelayHandler):
    """POST: release the user's lease (session) and its GPU slots."""

    @tornado.web.authenticated
    async def post(self, session_id: str) -> None:
        await self.relay(lambda api: api.release_session(session_id))


class RestartSessionHandler(_RelayHandler):
    """POST: restart the worker of the user's lease (its running cell is stopped)."""

    @tornado.web.authenticated
    async def post(self, session_id: str) -> None:
        await self.relay(lambda api: api.restart_session(session_id))


def setup_handlers(web_app: tornado.web.Application) -> None:
    base = url_path_join(web_app.settings["base_url"], "remote-gpu")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "status"), StatusHandler),
        (url_path_join(base, "jobs"), JobsHandler),
        (url_path_join(base, "jobs", _ID, "cancel"), CancelJobHandler),
        (url_path_join(base, "sessions", _ID, "release"), ReleaseSessionHandler),
        (url_path_join(base, "sessions", _ID, "restart"), RestartSessionHandler),
    ])
