"""The JSON views of the server that the HTTP API serves.

Visibility, for a token of user U: U sees every slot, every queue entry and
every lease with its user, size, state and times, because a shared machine
is only fair when everyone can see who waits and who holds; U sees the
session ids, job ids, code and output of U's own work only. An admin token
sees everything. Process ids (a slot's processes, a draining slot's
holders) are shown to an admin only: to others they are None, and a
draining slot's ``pids`` is empty. The shapes are a contract with the JupyterLab sidebar and
the ``rgpu`` CLI: add fields, never rename or drop one.

What a lease or a job came from is the owner's too: ``notebook`` (the path
the client named, None for a script) and ``first_line`` (the first non-empty
line of its code: a lease's latest cell, a job's own code).

Parked sessions (``parked``) hold no slot, so they are not leases: each
shows its user, size (GPUs asked for again at the restore, bytes on disk)
and times to everyone, and its id, names, notebook and code to its owner.

``disk`` is the users' disk limit for session folders (``--session-disk``,
see :mod:`.disk_watch`): the limit, what enforces it, and the caller's use;
an admin sees every user's use.

A slot's ``warm`` says whether a started worker waits on it for the next
lease: a lease takes that worker, and a fresh one is warmed after the
release, so a program that must not lease a cold slot (a benchmark) waits
for it here rather than reading the server's log.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from remote_gpu_core.fingerprint import local_fingerprint
from remote_gpu_core.ids import SlotId

from ..sessions.batch import BatchRunner
from ..scheduling.broker import LeaseBroker
from ..workers.drain import Draining
from ..gpus.discovery import Slot
from ..gpus.readings import Readings
from ..sessions.manager import SessionManager
from ..store import JobRecord, Store, TokenInfo

__all__ = ["DEFAULT_ENV", "FIRST_LINE_MAX", "ServerView", "first_line", "job_json", "output_text", "status_json",
           "usage_json"]

#: The longest ``first_line`` shown, in characters (an ellipsis marks a cut).
FIRST_LINE_MAX = 120
#: The environment every server has: its own Python.
DEFAULT_ENV = "default"


def first_line(code: str | None) -> str | None:
    """The first line of ``code`` that is not blank, stripped, at most
    :data:`FIRST_LINE_MAX` characters; None for no code or only blank lines."""
    for line in (code or "").splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= FIRST_LINE_MAX else line[: FIRST_LINE_MAX - 1] + "…"
    return None


@dataclasses.dataclass(frozen=True)
class ServerView:
    """What the status views read of a server."""

    version: str
    #: The server's slots, iterated afresh by every view (the live inventory:
    #: a cluster node's slots come and go).
    slots: Iterable[Slot]
    readings: Readings
    broker: LeaseBroker
    sessions: SessionManager
    batch: BatchRunner
    store: Store
    price_per_gpu_hour: float | None = None
    #: The name people know a slot's node by (this host's name for local slots).
    node_label: Callable[[Slot], str] = lambda slot: slot.node or socket.gethostname()
    #: Whether a slot's node is away (a cluster node that died).
    node_down: Callable[[Slot], bool] = lambda slot: False
    #: The ``isolation`` object: whether workers are isolated, and how.
    isolation: Callable[[], dict[str, Any]] = lambda: {"isolated": False, "mode": "none"}
    #: Whether a slot is draining: processes of a stopped worker still hold it (see :mod:`.drain`).
    draining: Callable[[SlotId], Draining | None] = lambda slot: None
    #: Seconds a parked session is kept (``--park-keep``), for its ``expires``.
    park_keep: float | None = None
    #: The ``disk`` object for a user (and whether they are an admin).
    disk: Callable[[str, bool], dict[str, Any]] = lambda user, admin: {"limit": None, "enforced_by": None}
    #: Whether a started worker waits on a slot for the next lease (see :mod:`.pool`).
    warm: Callable[[SlotId], bool] = lambda slot: False
    #: An environment's versions (see :mod:`remote_gpu_core.fingerprint`), or
    #: None for one the server does not have. ``default`` is the server's own
    #: Python, which its workers run.
    fingerprint: Callable[[str], dict[str, str] | None] = (
        lambda env: dict(local_fingerprint()) if env == DEFAULT_ENV else None)
    #: The environment of a slot's warm (or starting) worker, else None.
    warm_environment: Callable[[SlotId], str | None] = lambda slot: None
    #: The server's environments (see :mod:`..environments`) and their warm workers and demand.
    environments: Callable[[], list[dict[str, Any]]] = lambda: []

    def pool(self, slot: SlotId) -> str:
        """The name of the scheduler pool ``slot`` belongs to."""
        return self.broker.pool_of(slot).name


def _cost(view: ServerView, gpu_seconds: float) -> float | None:
    price = view.price_per_gpu_hour
    return None if price is None else round(gpu_seconds / 3600.0 * price, 4)


async def _leases(view: ServerView, me: TokenInfo) -> list[dict[str, Any]]:
    """Every lease in force: interactive sessions and running batch jobs."""
    now, mono = time.time(), time.monotonic()
    created = {record.id: record.created for record in await view.store.open_sessions()}
    leases = []
    for session in view.sessions:
        if session.released or session.parked is not None:
            continue
        idle = 0.0 if session.busy else max(0.0, mono - session.last_active)
        leases.append({"id": session.id, "kind": "interactive", "user": session.user,
                       "slots": [str(s) for s in session.slots], "since": created.get(session.id, now),
                       "idle": round(idle, 1), "job": None, "busy": session.busy,
                       "notebook": session.notebook, "first_line": first_line(session.last_code),
                       "ignoring_interrupt": session.ignoring_interrupt, "env": session.environment})
    for run in view.batch.running():
        leases.append({"id": run.session, "kind": "batch", "user": run.user,
                       "slots": [str(s) for s in run.slots], "since": run.since, "idle": 0.0,
                       "job": run.job, "busy": True, "notebook": None,
                       "first_line": first_line(run.code), "ignoring_interrupt": False,
                       "env": run.environment})
    for lease in leases:
        lease["mine"] = lease["user"] == me.user
        if not (lease["mine"] or me.admin):
            lease["id"] = None
            lease["job"] = None
            lease["notebook"] = None
            lease["first_line"] = None
            lease["ignoring_interrupt"] = None
    return leases


def _parked(view: ServerView, me: TokenInfo) -> list[dict[str, Any]]:
    """Every parked session, oldest first."""
    parked = []
    for session in view.sessions:
        state = session.parked
        if state is None or session.released:
            continue
        mine = session.user == me.user
        entry: dict[str, Any] = {
            "id": session.id, "user": session.user, "gpus": state.gpus, "pool": state.pool,
            "since": state.parked_at, "reason": state.reason, "nbytes": state.nbytes,
            "expires": state.parked_at + view.park_keep if view.park_keep is not None else None,
            "resuming": session.busy, "names": list(state.names), "unsaved": dict(state.unsaved),
            "notebook": session.notebook, "first_line": first_line(session.last_code), "mine": mine}
        if not (mine or me.admin):
            for key in ("id", "reason", "names", "unsaved", "notebook", "first_line"):
                entry[key] = None
        parked.append(entry)
    parked.sort(key=lambda p: p["since"])
    return parked


def _queue(view: ServerView, me: TokenInfo) -> list[dict[str, Any]]:
    now = time.time()
    scheduler = view.broker.scheduler
    positions = scheduler.positions()
    queue = []
    for entry in scheduler.waiting:
        mine = entry.user == me.user
        job = view.batch.job_of_key(entry.key)
        queue.append({
            "position": positions.get(entry.key),
            "user": entry.user,
            "gpus": entry.gpus,
            "priority": entry.priority,
            "pool": entry.pool,
            "waited": round(max(0.0, now - entry.submitted), 1),
            "mine": mine,
            "kind": "batch" if job is not None else "interactive",
            "job": job if (mine or me.admin) else None,
        })
    queue.sort(key=lambda q: (q["pool"], q["position"] or 0))
    return queue


async def usage_json(view: ServerView, me: TokenInfo, since: float | None = None) -> dict[str, Any]:
    """GPU-seconds (slots × time held) of every user, and cost where a price is set."""
    by_user = await view.store.gpu_seconds_by_user(since)
    users = []
    for user, seconds in sorted(by_user.items(), key=lambda kv: -kv[1]):
        users.append({"user": user, "gpu_seconds": round(seconds, 1), "cost": _cost(view, seconds),
                      "mine": user == me.user})
    mine = by_user.get(me.user, 0.0)
    total = sum(by_user.values())
    return {
        "price_per_gpu_hour": view.price_per_gpu_hour,
        "since": since,
        "you": {"user": me.user, "gpu_seconds": round(mine, 1), "cost": _cost(view, mine)},
        "total": {"gpu_seconds": round(total, 1), "cost": _cost(view, total)},
        "users": users,
    }


async def status_json(view: ServerView, me: TokenInfo) -> dict[str, Any]:
    """``GET /api/status``: the server, the caller, slots, queue, leases, usage."""
    leases = await _leases(view, me)
    holder: dict[str, dict[str, Any]] = {}
    lease_env: dict[str, str] = {}
    for lease in leases:
        for slot_id in lease["slots"]:
            lease_env[slot_id] = lease["env"]
            holder[slot_id] = {"user": lease["user"], "since": lease["since"], "mine": lease["mine"],
                               "kind": lease["kind"]}
            if lease["mine"] or me.admin:
                holder[slot_id]["session"] = lease["id"]
                holder[slot_id]["job"] = lease["job"]
                holder[slot_id]["notebook"] = lease["notebook"]
    slots = []
    for slot in view.slots:
        reading = view.readings.latest(slot.id)
        problem = reading.problem
        draining = view.draining(slot.id)
        if draining is not None and problem is None:
            problem = draining.describe(pids=me.admin)
        if view.node_down(slot):
            problem = f"node {view.node_label(slot)} is down: not leased until it is back"
        slots.append({
            "id": slot.id, "kind": slot.kind, "name": slot.name, "uuid": slot.uuid,
            "healthy": problem is None, "problem": problem,
            "draining": draining.as_json(pids=me.admin) if draining is not None else None,
            "pool": view.pool(slot.id),
            "node": view.node_label(slot),
            "readings": reading.as_json(pids=me.admin),
            "history": view.readings.history.as_json(slot.id),
            "holder": holder.get(slot.id),
            "warm": view.warm(slot.id),
            # The environment of the session that holds it, else of its warm worker.
            "env": lease_env.get(slot.id) or view.warm_environment(slot.id),
        })
    return {
        "server": {"version": view.version, "time": time.time()},
        "you": {"user": me.user, "admin": me.admin},
        "slots": slots,
        "queue": _queue(view, me),
        "sessions": leases,
        "parked": _parked(view, me),
        "usage": await usage_json(view, me),
        "isolation": view.isolation(),
        "disk": view.disk(me.user, me.admin),
        "envs": view.environments(),
    }


async def job_json(view: ServerView, job: JobRecord, *, code: bool = True) -> dict[str, Any]:
    """One job as ``GET /api/jobs/{id}`` shows it (its owner or an admin only)."""
    store = view.store
    spec = await store.batch_spec(job.id) if job.kind == "batch" else None
    attempts = await store.attempts(job.id) if spec else []
    gpu_seconds = await store.job_gpu_seconds(job)
    data: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "user": job.user, "state": job.state, "error": job.error,
        "name": spec.name if spec else None,
        "session": job.session, "slots": [s for s in job.slots.split(",") if s],
        "gpus": spec.gpus if spec else len([s for s in job.slots.split(",") if s]),
        "priority": spec.priority if spec else None, "pool": spec.pool if spec else None,
        "env": spec.env if spec else None,
        "timeout": spec.timeout if spec else None, "retries": spec.retries if spec else None,
        "attempt": spec.attempt if spec else None,
        "attempts": [{"attempt": a.attempt, "state": a.state, "error": a.error, "started": a.started,
                      "ended": a.ended, "slots": [s for s in a.slots.split(",") if s]}
                     for a in attempts],
        "created": job.created, "started": job.started, "ended": job.ended,
        "gpu_seconds": round(gpu_seconds, 1), "cost": _cost(view, gpu_seconds),
        "notebook": job.notebook, "first_line": first_line(job.code),
    }
    if code:
        data["code"] = job.code
    return data


def output_text(msg_type: str, content: dict[str, Any]) -> str:
    """What a terminal shows for one journaled output message."""
    if msg_type == "stream":
        return str(content.get("text", ""))
    if msg_type == "error":
        return "\n".join(str(line) for line in content.get("traceback") or []) + "\n"
    if msg_type in ("execute_result", "display_data"):
        data = content.get("data") or {}
        text = data.get("text/plain")
        return f"{text}\n" if text is not None else f"[{', '.join(sorted(data))}]\n"
    return ""
