"""Batch jobs: a submitted script with a lease of its own that ends with it.

A job is queued in the scheduler like any lease. When granted, it runs in a
fresh worker from the pool, its output journaled in the store under the job
id (one sequence across attempts), and when it ends its worker is recycled
and its slots go back. States::

    queued → running → completed | failed | cancelled | timed_out
               │
               └→ queued (the worker died and retries are left: again,
                          after 1, 2, 4 … s, up to BACKOFF_CAP)

A script that raises ends ``failed`` and is not retried; only a worker's
death (crash, kill, OOM killer) is. Past its ``timeout`` a job is
interrupted, killed after the server's kill grace, and ends ``timed_out``;
a cancel does the same and ends ``cancelled``. Every attempt is a row of
the store's ``job_attempts`` and a session of its own (for GPU-seconds).

A server that stops leaves its jobs as they were; the next one calls
:meth:`BatchRunner.recover`, which queues them again in their order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from typing import Any

from remote_gpu_core.errors import WorkerDied
from remote_gpu_core.ids import JobId, SessionId, SlotId

from ..environments import DEFAULT_ENVIRONMENT
from ..scheduling.broker import LeaseBroker
from ..errors import StoreError
from ..store.journal import Journal
from .output_bound import OutputBound
from ..scheduling.scheduler import DEFAULT_POOL, PRIORITIES, LeaseRequestEntry
from .session_worker import WorkerSource
from ..store import BatchSpec, OutputRow, Store
from ..workers.worker import Worker

__all__ = ["BACKOFF_BASE", "BACKOFF_CAP", "BatchRunner", "JobRequest", "RunningJob"]

log = logging.getLogger("remote_gpu_server")

#: The first retry waits this long (seconds); each next one twice as long.
BACKOFF_BASE = 1.0
#: No retry waits longer than this (seconds).
BACKOFF_CAP = 60.0
#: Lease keys of batch jobs start here, far from the connections' keys.
_KEYS = itertools.count(1 << 40)


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """A submission, as ``POST /api/jobs`` takes it; :meth:`parse` checks it."""

    code: str
    name: str = "script"
    gpus: int = 1
    priority: str = "normal"
    pool: str = DEFAULT_POOL
    timeout: float | None = None
    retries: int = 0
    #: The Python environment it runs in (see :mod:`..environments`).
    env: str = DEFAULT_ENVIRONMENT

    @classmethod
    def parse(cls, data: Any) -> JobRequest:
        """Build from decoded JSON; raise ValueError with a message for a user."""
        if not isinstance(data, dict):
            raise ValueError("a job is a JSON object with at least 'code'")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown job field(s): {', '.join(sorted(unknown))}")
        code = data.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ValueError("'code' must be the script's source, a non-empty string")
        name = data.get("name") or "script"
        gpus = data.get("gpus", 1)
        priority = data.get("priority") or "normal"
        pool = data.get("pool") or DEFAULT_POOL
        timeout = data.get("timeout")
        retries = data.get("retries", 0)
        env = data.get("env") or DEFAULT_ENVIRONMENT
        if not isinstance(env, str) or len(env) > 200 or "\0" in env:
            raise ValueError("'env' must be an environment's name")
        if not isinstance(name, str) or len(name) > 200:
            raise ValueError("'name' must be a string of at most 200 characters")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= 1 << 16:
            raise ValueError("'gpus' must be a whole number, 1 or more")
        if priority not in PRIORITIES:
            raise ValueError(f"'priority' must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        if not isinstance(pool, str) or len(pool) > 200:
            raise ValueError("'pool' must be a pool's name")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < 1e9):
            raise ValueError("'timeout' must be a number of seconds more than 0 (and finite)")
        if "\0" in code or "\0" in name or "\0" in pool:
            raise ValueError("'code', 'name' and 'pool' may not hold NUL characters")
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 100:
            raise ValueError("'retries' must be a whole number from 0 to 100")
        return cls(code, name, gpus, priority, pool,
                   float(timeout) if timeout is not None else None, retries, env)


@dataclasses.dataclass
class RunningJob:
    """A job's attempt that holds slots now."""

    job: JobId
    user: str
    attempt: int
    session: SessionId
    slots: tuple[SlotId, ...]
    since: float  # time.time()
    worker: Worker | None = None  # None while it starts
    ending: str | None = None  # "cancelled" or "timed_out" once it is being stopped
    reason: str | None = None
    task: asyncio.Task[dict[str, Any]] | None = None  # the script's execution
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # slots are back
    code: str = ""  # the script, for the status view
    environment: str = DEFAULT_ENVIRONMENT


class _Waiter:
    """Stands in for a connection while a job waits: remembers its position."""

    def __init__(self) -> None:
        self.position: int | None = None

    def queue_position(self, key: int, position: int) -> None:
        self.position = position


class BatchRunner:
    """Runs the server's batch jobs. Call :meth:`recover` once at start, :meth:`close` at the end.

    ``broker`` leases slots, ``pool`` gives workers, ``store`` and
    ``journal`` keep jobs and their output (``max_output`` bytes of each
    attempt, see :mod:`.output_bound`); ``kill_grace``: seconds between the
    interrupt of a job being stopped and the kill of its worker.
    """

    def __init__(self, store: Store, journal: Journal, broker: LeaseBroker, pool: WorkerSource, *,
                 kill_grace: float, max_output: int | None = None) -> None:
        self.store = store
        self.journal = journal
        self.max_output = max_output
        self.broker = broker
        self.pool = pool
        self.kill_grace = kill_grace
        self._tasks: dict[JobId, asyncio.Task[None]] = {}
        self._running: dict[JobId, RunningJob] = {}
        self._waiting: dict[int, tuple[JobId, _Waiter]] = {}  # lease key -> job
        self._closing = False

    async def _spec(self, job: JobId) -> BatchSpec:
        spec = await self.store.batch_spec(job)
        if spec is None:
            raise StoreError(f"job {job} is not a batch job")
        return spec

    # -- reading ------------------------------------------------------------

    def running(self) -> list[RunningJob]:
        return list(self._running.values())

    def job_of_key(self, key: int) -> JobId | None:
        """The batch job a waiting lease request belongs to, if any."""
        waiting = self._waiting.get(key)
        return waiting[0] if waiting else None

    def job_of_session(self, session: str) -> JobId | None:
        for run in self._running.values():
            if run.session == session:
                return run.job
        return None

    # -- submitting and cancelling ------------------------------------------

    async def submit(self, user: str, request: JobRequest) -> JobId:
        """Store a new job and queue it; raise ValueError if it can never run.

        If the store cannot take it (the database is away), the error says
        so and nothing is queued: a job is written whole or not at all.
        """
        request = dataclasses.replace(request, env=self.broker.environment(request.pool, request.env,
                                                                            self.pool.unknown_environment))
        pools = self.broker.pool_sizes()
        if request.pool not in pools:
            raise ValueError(f"there is no pool {request.pool!r}; pools: {', '.join(pools)}")
        slots = pools[request.pool]
        if request.gpus > slots:
            raise ValueError(f"pool {request.pool!r} has {slots} slot(s); "
                             f"a job of {request.gpus} can never run")
        job = await self.store.create_batch_job(user, request.code, request.name, request.gpus,
                                                request.priority, request.pool, request.timeout,
                                                request.retries, request.env)
        log.info("%s submitted batch job %d (%s, %d slot(s))", user, job, request.name, request.gpus)
        self._start(job)
        return job

    async def recover(self) -> list[JobId]:
        """Queue again, oldest first, the batch jobs an earlier run of this server left."""
        jobs = await self.store.recover_batch_jobs(
            "the server stopped while this job was running")
        for job in jobs:
            self._start(job)
        if jobs:
            log.warning("re-queued %d batch job(s) left by an earlier server", len(jobs))
        return jobs

    def _start(self, job: JobId) -> None:
        self._tasks[job] = asyncio.get_running_loop().create_task(self._run(job))

    async def cancel(self, job: JobId, reason: str) -> bool:
        """Cancel a queued or running job; False if it had already ended.

        A running job is interrupted, then killed after the kill grace; this
        returns once its slots are back.
        """
        run = self._running.get(job)
        if run is not None and run.worker is not None:
            await self._stop(run, "cancelled", reason)
            await run.done.wait()
            return True
        task = self._tasks.get(job)
        if task is None or task.done():
            return False
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if (await self.store.job(job)).state in ("queued", "running"):
            await self.store.finish_job(job, "cancelled", reason)
        return True

    async def _stop(self, run: RunningJob, state: str, reason: str) -> None:
        if run.ending is not None or run.worker is None:
            return
        run.ending, run.reason = state, reason
        await run.worker.interrupt()
        if run.task is not None:
            done, _ = await asyncio.wait({run.task}, timeout=self.kill_grace)
            if done:
                return
        log.info("batch job %d did not stop when interrupted: killing its worker", run.job)
        await run.worker.kill()

    async def close(self) -> None:
        """Stop every job and leave its state for :meth:`recover` on the next start."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # -- running ------------------------------------------------------------

    async def _run(self, job: JobId) -> None:
        try:
            while await self._attempt(job):
                spec = await self._spec(job)
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (spec.attempt - 1))
                log.info("batch job %d: retrying in %g s", job, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch job %d failed in the server", job)
            try:
                await self.store.finish_job(job, "failed", f"internal server error ({type(exc).__name__})")
            except Exception:
                log.exception("batch job %d: could not record its failure", job)
        finally:
            self._tasks.pop(job, None)

    async def _lease(self, job: JobId, user: str, gpus: int, priority: str,
                     pool: str, environment: str) -> tuple[SlotId, ...]:
        entry = LeaseRequestEntry(next(_KEYS), user, gpus, time.time(), priority=priority, pool=pool,
                                  environment=environment)
        waiter = _Waiter()
        self._waiting[entry.key] = (job, waiter)
        try:
            return await self.broker.wait_for_lease(entry, waiter, kind="batch")
        finally:
            self._waiting.pop(entry.key, None)

    async def _attempt(self, job: JobId) -> bool:
        """Run one attempt of ``job``; True if it should be retried."""
        record = await self.store.job(job)
        spec = await self._spec(job)
        try:
            slots = await self._lease(job, record.user, spec.gpus, spec.priority,
                                      spec.pool or DEFAULT_POOL, spec.env)
        except ValueError as exc:
            await self.store.finish_job(job, "failed", f"the lease was refused: {exc}")
            return False
        session = SessionId(uuid.uuid4().hex)
        try:
            await self.store.create_session(session, record.user, list(slots))
            attempt = await self.store.start_attempt(job, session, list(slots))
        except BaseException:
            self.broker.free(slots)
            raise
        run = RunningJob(job, record.user, attempt, session, slots, time.time(), code=record.code,
                         environment=spec.env)
        self._running[job] = run
        try:
            worker = await self.pool.take(list(slots), record.user, environment=spec.env)
        except asyncio.CancelledError:
            self._running.pop(job, None)
            if not self._closing:
                await self.store.finish_attempt(job, attempt, "cancelled", "cancelled while starting")
                await self.store.release_session(session, "cancelled while its worker started")
                self.broker.free(slots)
            raise
        except Exception as exc:
            self._running.pop(job, None)
            await self.store.release_session(session, "its worker failed to start")
            self.broker.free(slots)
            return await self._retry_or_fail(job, attempt, spec.retries, f"its worker failed to start: {exc}")
        run.worker = worker
        log.info("batch job %d attempt %d runs on %s", job, attempt, ",".join(slots))
        try:
            state, error = await self._execute(run, record.code, spec.timeout)
        except asyncio.CancelledError:
            await worker.kill()
            raise
        finally:
            self._running.pop(job, None)
        # Its output is written before its end, so a reader that sees the end has all of it.
        await self.journal.flush(timeout=10)
        try:
            await self.pool.recycle(worker)
            self.broker.free(slots)
            await self.store.release_session(session, f"batch job {job} attempt {attempt}: {error or state}")
            if state == "worker_died":
                return await self._retry_or_fail(job, attempt, spec.retries, error or "the worker died")
            await self.store.finish_attempt(job, attempt, state, error)
            await self.store.finish_job(job, state, error)
            log.info("batch job %d ended %s%s", job, state, f": {error}" if error else "")
            return False
        finally:
            run.done.set()  # a cancel returns now: the slots are back and the end is recorded

    async def _retry_or_fail(self, job: JobId, attempt: int, retries: int, error: str) -> bool:
        await self.store.finish_attempt(job, attempt, "failed", error)
        if attempt <= retries:
            await self.store.requeue_job(job, f"attempt {attempt} failed: {error}")
            return True
        tries = f" after {attempt} attempts" if attempt > 1 else ""
        await self.store.finish_job(job, "failed", f"{error}{tries}")
        return False

    async def _execute(self, run: RunningJob, code: str, timeout: float | None) -> tuple[str, str | None]:
        """Run the script; returns ``(state, error)``, state ``worker_died`` for a retry."""
        assert run.worker is not None
        job = run.job
        await self.journal.flush(timeout=10)  # an earlier attempt's output is counted
        seq = await self.store.last_output_seq(job)
        bound = OutputBound(self.max_output)

        async def on_iopub(msg: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            for kept in bound.add(OutputRow(run.session, seq, job, msg["msg_type"], msg["content"])):
                self.journal.append(kept)

        task = asyncio.get_running_loop().create_task(run.worker.execute(code, on_iopub))
        run.task = task
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                stopper = asyncio.get_running_loop().create_task(self._stop(
                    run, "timed_out", f"the job ran past its timeout of {timeout:g} s"))
                await asyncio.wait({task})
                await stopper
            reply = task.result()
        except WorkerDied as exc:
            if run.ending:
                return run.ending, run.reason
            return "worker_died", f"the worker died: {run.worker.exit_description or exc}"
        finally:
            if not task.done():
                task.cancel()
            for kept in bound.flush():
                self.journal.append(kept)
        if run.ending:
            return run.ending, run.reason
        if reply.get("status") == "ok":
            return "completed", None
        return "failed", f"{reply.get('ename')}: {reply.get('evalue')}"
