"""A blocking client for the server's HTTP API (what ``rgpu`` uses).

The server's URL is its websocket URL (``ws://host:port`` or ``wss://``);
the HTTP API is on the same port (``http://`` or ``https://``). Requests
carry the bearer token. Plain requests use :mod:`urllib.request`; a job
submission is one JSON message on a websocket opened at ``/api/jobs``,
because the server takes no HTTP request bodies.

TLS as every client does it (:mod:`.tls`): an ``https://`` (``wss://``)
server's certificate is verified against the system's CAs and ``cafile``;
the token never goes over plain ``http://`` to a host other than loopback
unless ``insecure``.

Errors: a refused token raises :class:`~.errors.AuthenticationError`, any
other error answer :class:`~.errors.ApiError` (with the HTTP ``status``), a
server that cannot be reached :class:`~.errors.ApiError` with status 0, and
a connection that cannot be made safe :class:`~.errors.TlsError`.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from remote_gpu_core import tls
from remote_gpu_core.login import ClientConfig
from remote_gpu_core.errors import ApiError, AuthenticationError

__all__ = ["ApiClient", "ApiError", "http_url"]


def http_url(url: str) -> str:
    """``ws://host:port/...`` → ``http://host:port`` (``wss`` → ``https``)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a server URL: {url!r} (expected ws://host:port)")
    return f"{scheme}://{parts.netloc}"


def _ws_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


class ApiClient:
    """One server and one token; every method is one request (or a few for ``follow``)."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0, *,
                 cafile: str | None = None, insecure: bool = False) -> None:
        self.url = url
        self.base = http_url(url)
        self.token = token
        self.timeout = timeout
        self.cafile = cafile
        self.insecure = insecure

    @classmethod
    def from_config(cls, url: str | None = None, token: str | None = None, *,
                    cafile: str | None = None, insecure: bool | None = None) -> ApiClient:
        """Arguments, then ``RGPU_URL``/``RGPU_TOKEN``/``RGPU_CA``/``RGPU_INSECURE``, then the file."""
        config = ClientConfig.load(url, token, cafile=cafile, insecure=insecure)
        return cls(config.url, config.token, cafile=config.cafile, insecure=config.insecure)

    # -- transport ----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _open(self, req: urllib.request.Request) -> bytes:
        """Send ``req``; the body of a 2xx answer. Raises as the module docstring says."""
        if self.token:
            tls.refuse_plain_text(self.base, self.insecure)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout,
                                        context=tls.ssl_context(self.base, self.cafile)) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read(), exc.reason)
            if exc.code == 401:
                raise AuthenticationError(f"the server refused the token: {message}") from None
            raise ApiError(message, exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise tls.tls_failure(reason, self.url, self.cafile) from None
            raise ApiError(f"cannot reach the server at {self.base}: {reason}", 0) from None

    def request(self, method: str, path: str, **query: Any) -> Any:
        """``method path?query`` → decoded JSON; raises as the module docstring says."""
        params = {k: v for k, v in query.items() if v is not None}
        url = self.base + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        body = self._open(urllib.request.Request(url, method=method, headers=self._headers()))
        return json.loads(body) if body else None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, **query)

    def post(self, path: str) -> Any:
        return self.request("POST", path)

    # -- endpoints ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self.get("/api/status"))

    def fingerprint(self, env: str = "default") -> dict[str, Any]:
        """Environment ``env``'s versions: ``{"env", "fingerprint": {name: version}}``."""
        return dict(self.get("/api/fingerprint", env=env))

    def usage(self, since: float | None = None) -> dict[str, Any]:
        return dict(self.get("/api/usage", since=since))

    def jobs(self, user: str | None = None, state: str | None = None, kind: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        return list(self.get("/api/jobs", user=user, state=state, kind=kind, limit=limit)["jobs"])

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.get(f"/api/jobs/{int(job_id)}"))

    def output(self, job_id: int, after: int = 0, limit: int | None = None) -> dict[str, Any]:
        """One page of a job's output after sequence number ``after``."""
        return dict(self.get(f"/api/jobs/{int(job_id)}/output", after=after or None, limit=limit))

    def outputs(self, job_id: int) -> list[dict[str, Any]]:
        """All of a job's output so far, every page."""
        outputs: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.output(job_id, after)
            outputs.extend(page["outputs"])
            after = int(page["last_seq"])
            if not page["more"]:
                return outputs

    def cancel(self, job_id: int) -> dict[str, Any]:
        return dict(self.post(f"/api/jobs/{int(job_id)}/cancel"))

    def release(self, session_id: str) -> dict[str, Any]:
        return dict(self.post(f"/api/sessions/{urllib.parse.quote(session_id, safe='')}/release"))

    def restart(self, session_id: str) -> dict[str, Any]:
        """A fresh worker for the session now; a running cell is stopped."""
        return dict(self.post(f"/api/sessions/{urllib.parse.quote(session_id, safe='')}/restart"))

    def metrics(self) -> str:
        """The Prometheus text; no token is sent."""
        return self._open(urllib.request.Request(self.base + "/metrics")).decode()

    def submit(self, code: str, name: str = "script", gpus: int = 1, priority: str = "normal",
               pool: str | None = None, timeout: float | None = None, retries: int = 0,
               env: str | None = None) -> dict[str, Any]:
        """Submit a batch job; returns the queued job's JSON (``id``, ``state``, ...).

        ``env``: the Python environment it runs in (None or ``default``: the
        server's own); sent only when another, so an older server refuses it
        ("unknown job field(s): env") rather than run it in the wrong one."""
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        job = {"code": code, "name": name, "gpus": gpus, "priority": priority, "pool": pool,
               "timeout": timeout, "retries": retries}
        if env and env != "default":
            job["env"] = env
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = _ws_url(self.url) + "/api/jobs"
        if self.token:
            tls.refuse_plain_text(url, self.insecure)
        context = tls.ssl_context(url, self.cafile)
        try:
            with connect(url, additional_headers=headers, open_timeout=self.timeout,
                         max_size=None, compression=None, ssl=context) as ws:
                ws.send(json.dumps({k: v for k, v in job.items() if v is not None}))
                answer = json.loads(ws.recv(timeout=self.timeout))
        except InvalidStatus as exc:
            message = _error_message(bytes(exc.response.body), exc.response.reason_phrase)
            if exc.response.status_code == 401:
                raise AuthenticationError(f"the server refused the token: {message}") from None
            raise ApiError(message, exc.response.status_code) from None
        except ssl.SSLError as exc:
            raise tls.tls_failure(exc, self.url, self.cafile) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise ApiError(f"cannot submit to the server at {self.url}: {exc}", 0) from None
        if "id" not in answer:
            raise ApiError(f"the job was refused: {answer.get('error')}", 400)
        return dict(answer)

    def follow(self, job_id: int, poll: float = 1.0, after: int = 0) -> Iterator[dict[str, Any]]:
        """Every output of ``job_id`` from ``after`` on, as it comes, until the job ends."""
        while True:
            page = self.output(job_id, after)
            yield from page["outputs"]
            after = int(page["last_seq"])
            if page["done"]:
                return
            if not page["more"]:
                time.sleep(poll)


def _error_message(body: bytes | None, fallback: str) -> str:
    try:
        return str(json.loads(body or b"")["error"])
    except (ValueError, KeyError, TypeError):
        text = (body or b"").decode(errors="replace").strip()
        return text.splitlines()[0] if text else fallback
