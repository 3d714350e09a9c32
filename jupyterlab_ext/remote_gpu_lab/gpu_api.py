"""Calls to the GPU server's HTTP API, and what each failure means to a user.

The GPU server serves its websocket and its HTTP JSON API on one port, so a
client URL ``ws://host:port`` becomes ``http://host:port`` (and ``wss`` becomes
``https``). Every failure is a :class:`GpuApiError` that says what happened
and what to do, ready to show in the sidebar.

TLS as every client does it (:mod:`remote_gpu_core.tls`): an ``https``
server's certificate is verified against the system's CAs and ``RGPU_CA``
(or ``rgpu login --cafile``); the token never goes over plain ``http`` to a
host that does not resolve to loopback unless ``RGPU_INSECURE=1``. A refused plain URL is
a ``bad-url`` problem and an untrusted certificate an ``unreachable`` one,
each with its own message and hint.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from remote_gpu_core import tls
from remote_gpu_core.login import ClientConfig, config_path
from remote_gpu_core.errors import InsecureConnection, TlsError

from .errors import GpuApiError

__all__ = ["GpuApi", "GpuApiError", "http_base_url"]

#: Seconds to wait for the GPU server; the sidebar polls every few seconds.
TIMEOUT = 5.0
#: Seconds to wait for a press (cancel, release, restart): stopping a worker whose
#: processes ignore SIGTERM takes the server's grace, and its slot's drain check.
ACTION_TIMEOUT = 60.0


def http_base_url(url: str) -> str:
    """``ws://host:port[/path]`` → ``http://host:port[/path]`` without a trailing slash."""
    parts = urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not a server URL: {url!r}")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class GpuApi:
    """The GPU server's HTTP API as this user sees it, with a fresh config per call.

    The configuration is read on every call (environment, then the file that
    ``rgpu login`` writes), so logging in again needs no restart of Jupyter.
    """

    def __init__(self, config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig.load()

    @property
    def url(self) -> str:
        return self.config.url

    async def status(self) -> Any:
        return await self._call("GET", "/api/status")

    async def jobs(self, limit: int = 20) -> dict[str, Any]:
        """``{"jobs": [the user's latest jobs, newest first], "total": how many they have}``.

        ``total`` is None where the server does not say (before it did, or a bare list).
        """
        data = await self._call("GET", f"/api/jobs?limit={int(limit)}")
        jobs = data.get("jobs") if isinstance(data, dict) else data
        total = data.get("total") if isinstance(data, dict) else None
        return {"jobs": jobs if isinstance(jobs, list) else [],
                "total": total if isinstance(total, int) and not isinstance(total, bool) else None}

    async def cancel_job(self, job_id: str) -> Any:
        return await self._call("POST", f"/api/jobs/{quote(job_id, safe='')}/cancel")

    async def release_session(self, session_id: str) -> Any:
        """Release from the sidebar: the notebook is told so (``?via=sidebar``)."""
        return await self._call("POST", f"/api/sessions/{quote(session_id, safe='')}/release?via=sidebar")

    async def restart_session(self, session_id: str) -> Any:
        return await self._call("POST", f"/api/sessions/{quote(session_id, safe='')}/restart?via=sidebar")

    async def _call(self, method: str, path: str) -> Any:
        try:
            base = http_base_url(self.config.url)
        except ValueError:
            raise GpuApiError(
                500, "bad-url", f"The Remote GPU server URL {self.config.url!r} is not a ws://, wss:// or http:// URL.",
                f"Set RGPU_URL or run `rgpu login URL TOKEN` (config file: {config_path()}).",
            ) from None
        if not self.config.token:
            raise GpuApiError(
                503, "no-token", "No token is configured for the Remote GPU server.",
                "Ask the server's admin for a token (`rgpu token create USER` on the GPU machine), "
                "then run `rgpu login URL TOKEN` or set RGPU_TOKEN before starting JupyterLab.",
            )
        try:
            # It resolves the host's name: not on the event loop.
            await asyncio.to_thread(tls.refuse_plain_text, base, self.config.insecure)
            context = tls.ssl_context(base, self.config.cafile)
        except InsecureConnection as exc:
            raise GpuApiError(
                500, "bad-url", f"Not connecting to the Remote GPU server: {exc.what}.",
                "Set RGPU_URL to the server's wss:// URL (or `rgpu login wss://... TOKEN`); on a "
                "network you trust, set RGPU_INSECURE=1 before starting JupyterLab.",
            ) from None
        except TlsError as exc:
            raise GpuApiError(
                500, "bad-url", f"Not connecting to the Remote GPU server: {exc.what}.",
                "Set RGPU_CA to a readable PEM file (or `rgpu login URL TOKEN --cafile PATH`).",
            ) from None
        request = HTTPRequest(
            base + path, method=method, body=b"" if method == "POST" else None,
            headers={"Authorization": f"Bearer {self.config.token}", "Accept": "application/json"},
            connect_timeout=TIMEOUT, request_timeout=ACTION_TIMEOUT if method == "POST" else TIMEOUT,
            follow_redirects=False,
            ssl_options=context,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except ssl.SSLError as exc:
            failure = tls.tls_failure(exc, self.config.url, self.config.cafile)
            hint = failure.hint[:1].upper() + failure.hint[1:] + "."
            if "--cafile" in failure.hint:  # say how JupyterLab gets it
                hint = ("Give JupyterLab the server's CA certificate (or its own certificate, if "
                        "self-signed): set RGPU_CA=PATH before starting JupyterLab, or run "
                        "`rgpu login URL TOKEN --cafile PATH`.")
            raise GpuApiError(502, "unreachable", f"The Remote GPU server is not trusted: {failure.what}.",
                              hint) from None
        except (OSError, HTTPClientError) as exc:
            raise GpuApiError(
                502, "unreachable", f"The Remote GPU server at {self.config.url} is unreachable ({exc}).",
                "Check that the GPU server is running (`rgpu serve`) and that RGPU_URL or "
                "`rgpu login` names its host and port.",
            ) from None
        if response.code == 599:
            error = response.error or "no response"
            raise GpuApiError(
                502, "unreachable", f"The Remote GPU server at {self.config.url} is unreachable ({error}).",
                "Check that the GPU server is running (`rgpu serve`) and that RGPU_URL or "
                "`rgpu login` names its host and port.",
            )
        text = (response.body or b"").decode("utf-8", "replace").strip()
        if response.code == 401:
            raise GpuApiError(
                502, "unauthorized", f"The Remote GPU server refused the token: {_one_line(text)}",
                "Get a new token from the server's admin and run `rgpu login URL TOKEN` "
                "(or set RGPU_TOKEN before starting JupyterLab).",
            )
        if response.code == 404:
            raise GpuApiError(404, "not-found", _one_line(text) or f"{path} was not found on the GPU server.")
        if response.code in (403, 409):
            raise GpuApiError(409, "conflict", _one_line(text) or "The GPU server refused this request.")
        if response.code >= 300:
            raise GpuApiError(
                502, "server-error", f"The Remote GPU server answered {response.code}: {_one_line(text)}",
                "Look at the GPU server's log for the cause.",
            )
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise GpuApiError(
                502, "server-error", "The Remote GPU server answered with something that is not JSON.",
                "Check that RGPU_URL names a Remote GPU server and not another service.",
            ) from None


def _one_line(text: str, limit: int = 300) -> str:
    """A JSON error body's ``error``/``message``/``reason``, or the text's first line."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "reason"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    line = text.splitlines()[0] if text else ""
    return line[:limit]
