"""The HTTP JSON API and ``/metrics``, on the websocket's port.

The websockets library hands every handshake to ``process_request``; a
request without ``Upgrade: websocket`` comes here and gets a JSON answer
(:meth:`HttpApi.handle`). Tokens are the websocket's bearer tokens; a bad
one gets 401 and a one-line reason. Endpoints (``{id}`` a job or session)::

    GET  /api/status                     slots, readings, queue, leases, usage
    GET  /api/usage[?since=EPOCH]        GPU-seconds and cost per user
    GET  /api/fingerprint[?env=NAME]     an environment's versions (Python, key packages)
    GET  /api/jobs[?user=U&state=S&kind=K&limit=N]   the latest N, and the total
    GET  /api/jobs/{id}                  one job, its attempts and code
    GET  /api/jobs/{id}/output[?after=SEQ&limit=N]   a page: more, done, last_seq
    POST /api/jobs/{id}/cancel           a running cell: interrupt, then the stop ladder
    POST /api/sessions/{id}/release[?via=sidebar]
    POST /api/sessions/{id}/restart[?via=sidebar]   a fresh worker now (the running cell is stopped)
    GET  /metrics                        Prometheus text format, no token

A job is submitted with a JSON object ``{"code", "name", "gpus",
"priority", "pool", "timeout", "retries"}``. The websockets library refuses
HTTP request bodies, so a submission is one text message on a websocket
opened at ``/api/jobs`` (:meth:`HttpApi.submit_over_websocket`), answered by
one text message, the job's JSON or ``{"error": ...}``.

Another user's job or session answers 404, as an unknown one does, so ids
reveal nothing; see :mod:`.status` for what else a user sees.

Every input is checked before use: ids and numbers must be in range and
finite, names known, headers the server acts on single. A bad one gets 400
(an unknown id 404) with a one-line reason that quotes at most a short piece
of the input; no answer carries an exception's text. Request lines over
8 KiB are answered 414 by the websockets library, before this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import re
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from remote_gpu_core.ids import JobId

from ..sessions.batch import JobRequest
from ..errors import HeaderError, HttpError, StoreError, TokenError
from .headers import bearer_token, is_websocket
from .metrics import Metrics
from .status import DEFAULT_ENV, ServerView, job_json, output_text, status_json, usage_json
from ..store import JOB_STATES, DatabaseUnavailable, JobRecord, TokenInfo

__all__ = ["HttpApi", "JOB_KINDS", "SUBMIT_PATH", "is_websocket", "json_response"]

log = logging.getLogger("remote_gpu_server")

#: The websocket path that takes job submissions.
SUBMIT_PATH = "/api/jobs"
#: Most output messages one ``/output`` answer holds; ask again ``after`` its last_seq.
OUTPUT_PAGE = 1000

_JOB = re.compile(r"^/api/jobs/([0-9]+)(/output|/cancel)?$")
#: The largest id or count a query may name (a store's INTEGER).
_INT_MAX = (1 << 63) - 1
#: The kinds of job ``GET /api/jobs?kind=`` takes.
JOB_KINDS = ("cell", "batch")
_SESSION_ACTION = re.compile(r"^/api/sessions/([0-9a-f]{1,64})/(release|restart)$")


def json_response(status: HTTPStatus, body: Any, extra: list[tuple[str, str]] | None = None) -> Response:
    # allow_nan=False: NaN and Infinity are not JSON; a value that would
    # need them is a bug to be logged, never an answer.
    data = (json.dumps(body, separators=(",", ":"), allow_nan=False) + "\n").encode()
    return _response(status, data, "application/json", extra)


def _response(status: HTTPStatus, data: bytes, content_type: str,
              extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ])
    return Response(status.value, status.phrase, headers, data)


def _quote(text: str, limit: int = 40) -> str:
    """``text`` for an error message: repr, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


class HttpApi:
    """Answers the HTTP requests of one server, from its ``view`` and ``metrics``."""

    def __init__(self, view: ServerView, metrics: Metrics) -> None:
        self.view = view
        self.metrics = metrics

    # -- entry points -------------------------------------------------------

    async def handle(self, connection: ServerConnection, request: Request) -> Response:
        """Answer one plain HTTP request; never raises."""
        url = urlsplit(request.path)
        method = getattr(request, "method", "GET")
        try:
            if url.path == "/metrics":
                self._method(method, "GET")
                return _response(HTTPStatus.OK, await self.metrics.render(),
                                 "text/plain; version=0.0.4; charset=utf-8")
            me = await self._authenticate(request)
            query = _query(url.query)
            body = await self._route(method, url.path, query, me)
            return json_response(HTTPStatus.OK, body)
        except HttpError as exc:
            extra = [("WWW-Authenticate", "Bearer")] if exc.status == HTTPStatus.UNAUTHORIZED else None
            return json_response(exc.status, {"error": str(exc)}, extra)
        except (DatabaseUnavailable, OSError):
            log.exception("HTTP %s %s: the store is unavailable", method, url.path)
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"error": "the server's database is unavailable; try again shortly"})
        except Exception:
            log.exception("HTTP %s %s failed", method, url.path)
            return json_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                 {"error": "internal server error; the server's log has more"})

    async def submit_over_websocket(self, ws: ServerConnection, me: TokenInfo) -> None:
        """Take one job submission (a JSON text message) and answer with the job."""
        try:
            message = await ws.recv()
        except ConnectionClosed:
            return
        try:
            if not isinstance(message, str):
                raise ValueError("send the job as one JSON text message")
            try:
                data = json.loads(message)
            except (ValueError, RecursionError):  # also json.JSONDecodeError
                raise ValueError("the job is not a JSON object this server reads (invalid JSON, a "
                                 "number too long or nesting too deep)") from None
            request = JobRequest.parse(data)
            job = await self.view.batch.submit(me.user, request)
            answer: dict[str, Any] = await job_json(self.view, await self.view.store.job(job), code=False)
        except ValueError as exc:  # JobRequest.parse's message, or a refused pool or size
            answer = {"error": str(exc)}
        except (DatabaseUnavailable, OSError):
            log.exception("a job submission failed: the store is unavailable")
            answer = {"error": "the server's database is unavailable: the job was not submitted; "
                               "try again shortly"}
        try:
            await ws.send(json.dumps(answer))
            await ws.close()
        except ConnectionClosed:
            pass

    # -- routing ------------------------------------------------------------

    async def _authenticate(self, request: Request) -> TokenInfo:
        try:
            token = bearer_token(request)
        except HeaderError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
        try:
            return await self.view.store.verify_token(token)
        except TokenError as exc:
            raise HttpError(HTTPStatus.UNAUTHORIZED, str(exc)) from None

    @staticmethod
    def _method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED,
                            f"{_quote(method, 20)} is not allowed here; use {' or '.join(allowed)}")

    async def _route(self, method: str, path: str, query: dict[str, str], me: TokenInfo) -> Any:
        view = self.view
        if path == "/api/status":
            self._method(method, "GET")
            return await status_json(view, me)
        if path == "/api/usage":
            self._method(method, "GET")
            return await usage_json(view, me, _finite(query, "since"))
        if path == "/api/fingerprint":
            self._method(method, "GET")
            env = query.get("env", DEFAULT_ENV)
            versions = await asyncio.to_thread(view.fingerprint, env)  # metadata reads: off the loop
            if versions is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no environment {_quote(env)} on this server "
                                                      "('rgpu envs' lists them)")
            return {"env": env, "fingerprint": versions}
        if path == "/api/jobs":
            if method == "POST":
                raise HttpError(HTTPStatus.BAD_REQUEST, (
                    "this server takes no HTTP request bodies: submit a job as one JSON text "
                    f"message on a websocket opened at {SUBMIT_PATH} (rgpu submit does this)"))
            self._method(method, "GET")
            return await self._jobs(query, me)
        found = _JOB.match(path)
        if found:
            action = found.group(2)
            self._method(method, "POST" if action == "/cancel" else "GET")
            job = await self._own_job(found.group(1), me)
            if action is None:
                return await job_json(view, job)
            if action == "/output":
                return await self._output(job, _whole(query, "after", 0, 0, _INT_MAX),
                                          _whole(query, "limit", OUTPUT_PAGE, 1, OUTPUT_PAGE))
            return await self._cancel(job, me)
        found = _SESSION_ACTION.match(path)
        if found:
            self._method(method, "POST")
            via = _via(query)
            if found.group(2) == "restart":
                return await self._restart(found.group(1), me, via)
            return await self._release(found.group(1), me, via)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {_quote(path, 80)}")

    # -- jobs ---------------------------------------------------------------

    async def _own_job(self, digits: str, me: TokenInfo) -> JobRecord:
        """The job ``digits`` names if the caller may see it, else 404 (as for an unknown id)."""
        job_id = int(digits) if len(digits) <= 19 else None  # longer: past any id
        job = None
        if job_id is not None and 0 < job_id <= _INT_MAX:
            try:
                job = await self.view.store.job(JobId(job_id))
            except StoreError:
                job = None
        if job is None or not (me.admin or job.user == me.user):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {_quote(digits, 20)[1:-1]} of yours on this server")
        return job

    async def _jobs(self, query: dict[str, str], me: TokenInfo) -> dict[str, Any]:
        user = query.get("user") or None
        if not me.admin:
            if user not in (None, me.user):
                raise HttpError(HTTPStatus.FORBIDDEN,
                                "only an admin token can list another user's jobs")
            user = me.user
        state = query.get("state") or None
        if state is not None and state not in JOB_STATES:
            raise HttpError(HTTPStatus.BAD_REQUEST,
                            f"unknown state {state!r}: use one of {', '.join(JOB_STATES)}")
        kind = query.get("kind") or None
        if kind is not None and kind not in JOB_KINDS:
            raise HttpError(HTTPStatus.BAD_REQUEST,
                            f"unknown kind {_quote(kind)}: use one of {', '.join(JOB_KINDS)}")
        limit = _whole(query, "limit", 100, 1, 1000)
        jobs = await self.view.store.jobs(user=user, state=state, kind=kind, limit=limit)
        total = await self.view.store.count_jobs(user=user, state=state, kind=kind)
        return {"jobs": [await job_json(self.view, j, code=False) for j in jobs], "total": total}

    async def _output(self, job: JobRecord, after: int, limit: int) -> dict[str, Any]:
        """A page of output; ``more``: another page is there now; ``done``: none will come."""
        state = (await self.view.store.job(job.id)).state  # read first: output comes before the end
        outputs = await self.view.store.outputs_after(job.id, after, limit + 1)
        more = len(outputs) > limit
        outputs = outputs[:limit]
        return {
            "id": job.id,
            "state": state,
            "more": more,
            "done": state not in ("queued", "running") and not more,
            "last_seq": outputs[-1][0] if outputs else after,
            "outputs": [{"seq": seq, "attempt": attempt, "msg_type": msg_type, "content": content,
                         "text": output_text(msg_type, content)}
                        for seq, attempt, msg_type, content in outputs],
        }

    async def _cancel(self, job: JobRecord, me: TokenInfo) -> dict[str, Any]:
        view = self.view
        if job.state not in ("queued", "running"):
            raise HttpError(HTTPStatus.CONFLICT, f"job {job.id} already ended ({job.state})")
        reason = f"cancelled by {me.user}"
        if job.kind == "batch":
            if not await view.batch.cancel(job.id, reason):
                raise HttpError(HTTPStatus.CONFLICT, f"job {job.id} already ended")
        else:
            session = view.sessions.get(job.session) if job.session else None
            if session is None:
                raise HttpError(HTTPStatus.CONFLICT, f"job {job.id}'s session is gone")
            # The same ladder as the stop button: an interrupt, then a fresh worker.
            if not await session.cancel(job.id, reason):
                raise HttpError(HTTPStatus.CONFLICT, f"job {job.id} is not running")
        return await job_json(view, await view.store.job(job.id), code=False)

    async def _restart(self, session_id: str, me: TokenInfo, via: str | None) -> dict[str, Any]:
        """Give a session a fresh worker now, stopping its running cell with the ladder."""
        session = self.view.sessions.get(session_id)
        if session is None or not (me.admin or session.user == me.user):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no session {session_id} of yours holds a lease")
        reason = _asked(me, session.user, via)
        await session.restart(reason)
        return {"session": session_id, "restarted": True, "reason": f"restarted {reason}"}

    async def _release(self, session_id: str, me: TokenInfo, via: str | None) -> dict[str, Any]:
        view = self.view
        session = view.sessions.get(session_id)
        if session is not None and (me.admin or session.user == me.user):
            reason = f"released {_asked(me, session.user, via)}"
            await view.sessions.release(session, reason)
            return {"session": session_id, "released": True, "reason": reason}
        job = view.batch.job_of_session(session_id)
        if job is not None:
            record = await view.store.job(job)
            if me.admin or record.user == me.user:
                reason = f"released {_asked(me, record.user, via)}"
                await view.batch.cancel(job, reason)
                return {"session": session_id, "released": True, "reason": reason, "job": job}
        raise HttpError(HTTPStatus.NOT_FOUND, f"no session {session_id} of yours holds a lease")


#: Where a release or restart may say it was asked from (``?via=``), in the words its session's notebook reads.
_VIA = {"sidebar": "from the Remote GPU sidebar"}


def _via(query: dict[str, str]) -> str | None:
    """``?via=``: a known place, or None; 400 for another."""
    via = query.get("via")
    if via is None:
        return None
    if via not in _VIA:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown via {_quote(via)}: use one of {', '.join(_VIA)}")
    return _VIA[via]


def _asked(me: TokenInfo, owner: str, via: str | None) -> str:
    """Who asked, and from where: what the session's owner is told (one's own
    release from the sidebar needs no name; an admin's always gives one)."""
    if via is None:
        return f"by {me.user} through the HTTP API"
    return via if me.user == owner else f"{via} by {me.user}"


def _query(text: str) -> dict[str, str]:
    """The query's parameters, the last value of each; 400 for one holding a NUL
    (no name, state or number has one, and PostgreSQL refuses them)."""
    query = {k: v[-1] for k, v in parse_qs(text).items()}
    for name, value in query.items():
        if "\0" in name or "\0" in value:
            raise HttpError(HTTPStatus.BAD_REQUEST, "query parameters may not hold NUL characters")
    return query


def _whole(query: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """Parameter ``name`` as a whole number from ``low`` to ``high``; ``default`` if absent."""
    value = query.get(name)
    if value is None or value == "":
        return default
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", value) or not low <= int(value) <= high:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        f"{name} must be a whole number from {low} to {high}, not {_quote(value)}")
    return int(value)


def _finite(query: dict[str, str], name: str) -> float | None:
    """Parameter ``name`` as a finite number (seconds since the epoch); None if absent."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        number = float(value) if len(value) <= 40 else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or abs(number) > 1e13:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        f"{name} must be a finite number of seconds since the epoch, not {_quote(value)}")
    return number
