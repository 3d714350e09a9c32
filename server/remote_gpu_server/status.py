"""The JSON views of the server that the HTTP API serves.

Visibility, for a token of user U: U sees every slot, every queue entry and
every lease with its user, size, state and times, because a shared machine
is only fair when everyone can see who waits and who holds; U sees the
session ids, job ids, code and output of U's own work only. An admin token
sees everything. The shapes are a contract with the JupyterLab sidebar and
the ``rgpu`` CLI: add fields, never rename or drop one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from remote_gpu_kernel.typing import SlotId

from .scheduler import DEFAULT_POOL
from .store import JobRecord, TokenInfo

if TYPE_CHECKING:
    from .app import GpuServer

__all__ = ["job_json", "output_text", "slot_pool", "status_json", "usage_json"]


def slot_pool(server: GpuServer, slot: SlotId) -> str:
    """The name of the scheduler pool ``slot`` belongs to."""
    pool_of = getattr(server.scheduler, "pool_of", None)
    if pool_of is None:
        return DEFAULT_POOL
    return str(pool_of(slot).name)


def _cost(server: GpuServer, gpu_seconds: float) -> float | None:
    price = server.config.price_per_gpu_hour
    return None if price is None else round(gpu_seconds / 3600.0 * price, 4)


def _leases(server: GpuServer, me: TokenInfo) -> list[dict[str, Any]]:
    """Every lease in force: interactive sessions and running batch jobs."""
    now, mono = time.time(), time.monotonic()
    created = {sid: since for sid, _user, _slots, since in server.store.open_sessions()}
    leases = []
    for session in server.sessions.values():
        if session.released:
            continue
        idle = 0.0 if session.busy else max(0.0, mono - session.last_active)
        leases.append({"id": session.id, "kind": "interactive", "user": session.user,
                       "slots": [str(s) for s in session.slots], "since": created.get(session.id, now),
                       "idle": round(idle, 1), "job": None})
    for run in server.batch.running():
        leases.append({"id": run.session, "kind": "batch", "user": run.user,
                       "slots": [str(s) for s in run.slots], "since": run.since, "idle": 0.0,
                       "job": run.job})
    for lease in leases:
        lease["mine"] = lease["user"] == me.user
        if not (lease["mine"] or me.admin):
            lease["id"] = None
            lease["job"] = None
    return leases


def _queue(server: GpuServer, me: TokenInfo) -> list[dict[str, Any]]:
    now = time.time()
    positions = server.scheduler.positions()
    queue = []
    for entry in server.scheduler.waiting:
        mine = entry.user == me.user
        job = server.batch.job_of_key(entry.key)
        queue.append({
            "position": positions.get(entry.key),
            "user": entry.user,
            "gpus": entry.gpus,
            "priority": getattr(entry, "priority", "normal"),
            "pool": getattr(entry, "pool", DEFAULT_POOL),
            "waited": round(max(0.0, now - entry.submitted), 1),
            "mine": mine,
            "kind": "batch" if job is not None else "interactive",
            "job": job if (mine or me.admin) else None,
        })
    queue.sort(key=lambda q: (q["pool"], q["position"] or 0))
    return queue


def usage_json(server: GpuServer, me: TokenInfo, since: float | None = None) -> dict[str, Any]:
    """GPU-seconds (slots × time held) of every user, and cost where a price is set."""
    by_user = server.store.gpu_seconds_by_user(since)
    users = []
    for user, seconds in sorted(by_user.items(), key=lambda kv: -kv[1]):
        users.append({"user": user, "gpu_seconds": round(seconds, 1), "cost": _cost(server, seconds),
                      "mine": user == me.user})
    mine = by_user.get(me.user, 0.0)
    total = sum(by_user.values())
    return {
        "price_per_gpu_hour": server.config.price_per_gpu_hour,
        "since": since,
        "you": {"user": me.user, "gpu_seconds": round(mine, 1), "cost": _cost(server, mine)},
        "total": {"gpu_seconds": round(total, 1), "cost": _cost(server, total)},
        "users": users,
    }


def status_json(server: GpuServer, me: TokenInfo) -> dict[str, Any]:
    """``GET /api/status``: the server, the caller, slots, queue, leases, usage."""
    leases = _leases(server, me)
    holder: dict[str, dict[str, Any]] = {}
    for lease in leases:
        for slot_id in lease["slots"]:
            holder[slot_id] = {"user": lease["user"], "since": lease["since"], "mine": lease["mine"],
                               "kind": lease["kind"]}
            if lease["mine"] or me.admin:
                holder[slot_id]["session"] = lease["id"]
                holder[slot_id]["job"] = lease["job"]
    slots = []
    for slot in server.slots:
        reading = server.readings.latest(slot.id)
        slots.append({
            "id": slot.id, "kind": slot.kind, "name": slot.name, "uuid": slot.uuid,
            "healthy": reading.healthy, "problem": reading.problem,
            "pool": slot_pool(server, slot.id),
            "readings": reading.as_json(),
            "holder": holder.get(slot.id),
        })
    return {
        "server": {"version": server.version, "time": time.time()},
        "you": {"user": me.user, "admin": me.admin},
        "slots": slots,
        "queue": _queue(server, me),
        "sessions": leases,
        "usage": usage_json(server, me),
        "isolation": server.isolation.status_json(),
    }


def job_json(server: GpuServer, job: JobRecord, *, code: bool = True) -> dict[str, Any]:
    """One job as ``GET /api/jobs/{id}`` shows it (its owner or an admin only)."""
    store = server.store
    spec = store.batch_spec(job.id) if job.kind == "batch" else None
    attempts = store.attempts(job.id) if spec else []
    gpu_seconds = store.job_gpu_seconds(job)
    data: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "user": job.user, "state": job.state, "error": job.error,
        "name": spec.name if spec else None,
        "session": job.session, "slots": [s for s in job.slots.split(",") if s],
        "gpus": spec.gpus if spec else len([s for s in job.slots.split(",") if s]),
        "priority": spec.priority if spec else None, "pool": spec.pool if spec else None,
        "timeout": spec.timeout if spec else None, "retries": spec.retries if spec else None,
        "attempt": spec.attempt if spec else None,
        "attempts": [{"attempt": a.attempt, "state": a.state, "error": a.error, "started": a.started,
                      "ended": a.ended, "slots": [s for s in a.slots.split(",") if s]}
                     for a in attempts],
        "created": job.created, "started": job.started, "ended": job.ended,
        "gpu_seconds": round(gpu_seconds, 1), "cost": _cost(server, gpu_seconds),
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
