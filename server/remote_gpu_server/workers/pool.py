"""The warm pool: one started worker waiting on every free slot.

A lease takes the slot's warm worker (already started, torch imported), so
it does not pay a cold start. A worker serves one session and is never
reused: :meth:`Pool.recycle` kills it and warms a fresh one in its place. A
lease of several slots starts a worker pinned to all of them (cold), and
the single-slot workers it displaces are recycled. Workers come from a
:class:`~.launcher.WorkerLauncher`; the pool never builds a process itself.

Every worker is killed with the stop ladder (``term_grace`` seconds between
SIGTERM and SIGKILL, see :mod:`.ladder`). After a leased worker's kill,
``drain`` (see :mod:`.drain`) waits until none of its processes holds its
slots before they go back; a slot still held is draining, and gets its
warm worker only once it is free (the server calls :meth:`Pool.add`).

The pool tells ``on_readiness`` (the scheduler's, see
:meth:`.Scheduler.set_readiness`) what each slot's worker is doing as it
changes: starting when it begins to warm one, warm once it has started,
cold when its start failed or a lease took it, and in which environment,
so that a grant takes a slot whose worker is warm in the lease's environment
where there is one. It tells ``on_take`` what each lease found on its slots
and how long it waited for its worker.

Environments (see :mod:`..environments`): each warm worker runs one; which
one a slot's next warm worker runs is :class:`.warm_environments.WarmEnvironments`'
choice (one each where slots allow, more for the busy ones). A lease whose
slot's warm worker runs another environment throws it away and starts one
in its own.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from remote_gpu_core.ids import SlotId

from ..processes import ladder
from ..gpus.discovery import Slot
from ..isolation.tenant import Tenant
from ..scheduling.leases import Readiness
from ..environments import DEFAULT_ENVIRONMENT
from .launcher import WorkerLauncher
from .warm_environments import WarmEnvironments
from .worker import GpuErrors, Worker

__all__ = ["DrainCheck", "Pool", "ReadinessListener", "TakeListener"]

#: Waits until none of some pids holds the slots; returns the slots still
#: held, now draining (see :meth:`.drain.Drainer.settle`; ``check``: read the GPUs again).
DrainCheck = Callable[[list[SlotId], frozenset[int], bool], Awaitable[frozenset[SlotId]]]
#: Told what a slot's worker is doing now, and in which environment; must not block.
ReadinessListener = Callable[[SlotId, Readiness, str | None], None]
#: Told, for each lease, what it found on its slots and the seconds it waited for its worker.
TakeListener = Callable[[Readiness, float], None]

log = logging.getLogger("remote_gpu_server")


class Pool:
    """Call :meth:`start` first and :meth:`close` at the end."""

    def __init__(self, launcher: WorkerLauncher, slots: Iterable[Slot], startup_timeout: float = 120,
                 is_down: Callable[[Slot], bool] = lambda slot: False, *, term_grace: float = 0.0,
                 environments: Sequence[str] = (DEFAULT_ENVIRONMENT,),
                 slot_environments: Mapping[SlotId, Sequence[str]] | None = None) -> None:
        self.launcher = launcher
        self.term_grace = term_grace
        #: Set by the server once its readings exist (see the module docstring).
        self.drain: DrainCheck | None = None
        #: What a worker's GPUs reported while it ran, for its cause of death (see :mod:`.xid`).
        self.gpu_errors: GpuErrors | None = None
        #: Set by the server before :meth:`start` (see the module docstring).
        self.on_readiness: ReadinessListener | None = None
        self.on_take: TakeListener | None = None
        self._is_down = is_down  # a slot whose node is away gets no warm worker
        self.slots = {s.id: s for s in slots}
        self.startup_timeout = startup_timeout
        self._warm: dict[SlotId, asyncio.Task[Worker]] = {}
        #: Which environment each slot's warm worker runs, and the demand for each.
        self.environments = WarmEnvironments(environments)
        self._slot_envs = dict(slot_environments or {})  # the slots of pools that run only some
        self._warm_env: dict[SlotId, str] = {}
        self._workers: set[Worker] = set()
        self._closing = False

    def start(self) -> None:
        for slot_id in self.slots:
            self._warm_up(slot_id)

    def add(self, slots: Iterable[Slot]) -> None:
        """Slots that joined, or whose node came back: warm a worker on each that has none."""
        for slot in slots:
            self.slots[slot.id] = slot
            task = self._warm.get(slot.id)
            if task is None or (task.done() and (task.exception() is not None or not task.result().alive)):
                self._warm_up(slot.id)

    def _warm_up(self, slot_id: SlotId) -> None:
        if self._closing or self._is_down(self.slots[slot_id]):
            return
        others = [self._warm_env[s] for s in self._warm if s != slot_id and s in self._warm_env]
        environment = self._warm_env[slot_id] = self.environments.choose(others, self._slot_envs.get(slot_id, ()))
        task = asyncio.get_running_loop().create_task(self._start([self.slots[slot_id]], environment=environment))
        self._warm[slot_id] = task
        self._tell(slot_id, Readiness.STARTING)
        task.add_done_callback(functools.partial(self._warmed, slot_id))

    def _warmed(self, slot_id: SlotId, task: asyncio.Task[Worker]) -> None:
        """``slot_id``'s warm worker started, or failed to."""
        if self._warm.get(slot_id) is not task:
            return  # a lease took it, or another replaced it: they said what the slot is now
        if task.cancelled():
            return  # the pool is closing
        error = task.exception()
        if error is None and task.result().alive:
            self._tell(slot_id, Readiness.WARM)
            return
        log.warning("slot %s: its warm worker failed to start (%s); a lease of it starts one",
                    slot_id, error or "it died at once")
        self._tell(slot_id, Readiness.COLD)

    def _tell(self, slot_id: SlotId, readiness: Readiness) -> None:
        if self.on_readiness is not None:
            self.on_readiness(slot_id, readiness, self._warm_env.get(slot_id))

    def _took(self, slot_ids: list[SlotId], found: Readiness, started: float) -> None:
        """A lease of ``slot_ids`` has its worker: say what it found and how long it waited."""
        waited = time.monotonic() - started
        if found is Readiness.STARTING:
            log.info("lease of %s: its worker was still starting; waited %.2f s for it", slot_ids[0], waited)
        elif found is Readiness.COLD:
            log.info("lease of %s: no worker was there; waited %.2f s for one to start",
                     ",".join(slot_ids), waited)
        if self.on_take is not None:
            self.on_take(found, waited)

    def _taken(self, slot_id: SlotId) -> asyncio.Task[Worker] | None:
        """The slot's warm worker (maybe still starting), now a lease's: the slot has none."""
        task = self._warm.pop(slot_id, None)
        self._tell(slot_id, Readiness.COLD)
        return task

    async def _start(self, slots: list[Slot], tenant: Tenant | None = None,
                     environment: str = DEFAULT_ENVIRONMENT) -> Worker:
        started = time.monotonic()
        worker = await Worker.start(self.launcher, slots, self.startup_timeout, tenant,
                                    term_grace=self.term_grace, gpu_errors=self.gpu_errors, environment=environment)
        self.environments.started(environment, time.monotonic() - started)
        self._workers.add(worker)
        return worker

    async def _settle(self, worker: Worker) -> frozenset[SlotId]:
        """After a leased worker's kill: wait for its processes to let go of its
        slots; returns those still held at the drain deadline (draining)."""
        if self.drain is None:
            return frozenset()
        gpu_error = self.gpu_errors is not None and self.gpu_errors(worker.slots, worker.started_at)
        return await self.drain([s.id for s in worker.slots], worker.stopped_pids, bool(gpu_error))

    async def _enter(self, worker: Worker, user: str, new_lease: bool = True) -> Worker:
        """``worker``, ``user``'s; killed (and its new lease's folder gone) if it could not be.

        A new lease's worker becomes theirs while the lease is answered (its
        requests wait: see :meth:`Worker.enter`); one that then cannot is killed,
        which its session hears as a death (a fresh worker in the same folder)."""
        try:
            await worker.enter(user, later=new_lease)
        except BaseException:
            await worker.kill()
            if new_lease:
                self.launcher.release(worker.tenant)
            raise
        if worker.entering is not None:
            worker.entering.add_done_callback(lambda task: self._entered(worker, task))
        return worker

    def _entered(self, worker: Worker, task: asyncio.Task[None]) -> None:
        why = "it was cancelled" if task.cancelled() else task.exception()  # retrieved, whatever comes next
        if why is None or not worker.alive:
            return  # it entered; or it was stopped meanwhile (its lease released at once) or died: its session hears
        log.error("worker %s could not become its lease's, and is stopped: %s", worker.name, why)
        asyncio.get_running_loop().create_task(worker.kill(f"it could not become its lease's: {why}"))

    def workers_on(self, slot_ids: Iterable[SlotId]) -> list[Worker]:
        """The live workers (warm or leased) on any of ``slot_ids``."""
        wanted = set(slot_ids)
        return [w for w in self._workers if w.alive and any(s.id in wanted for s in w.slots)]

    def device(self, slot_id: SlotId) -> int | None:
        """The GPU index (on its node) of the worker that holds ``slot_id``, where its
        launcher chose one (Ray assigns a worker's GPUs); None: the slot's own index."""
        for worker in self._workers:
            devices = getattr(worker.process, "devices", None)
            if worker.alive and devices:
                for slot, device in zip(worker.slots, devices):
                    if slot.id == slot_id:
                        return int(device)
        return None

    def workers(self) -> list[Worker]:
        """The live workers, warm or leased."""
        return [w for w in self._workers if w.alive]

    def scopes(self) -> list[ladder.Scope]:
        """Where this host's live workers' processes are (see :mod:`.owners`)."""
        return [scope for w in self._workers if w.alive and (scope := getattr(w.process, "scope", None)) is not None]

    def worker_pids(self, slot_id: SlotId) -> list[int]:
        """Process ids of the live workers on ``slot_id`` (warm or leased)."""
        # A worker still starting has no pid yet; a dead or killed one is dropped.
        self._workers = {w for w in self._workers if w.alive}
        return [w.pid for w in self._workers
                if w.alive and w.pid is not None and any(s.id == slot_id for s in w.slots)]

    async def wait_ready(self) -> None:
        """Wait until every slot's warm worker has started (for tests, benches)."""
        await asyncio.gather(*self._warm.values(), return_exceptions=True)

    def is_warm(self, slot_id: SlotId, environment: str | None = None) -> bool:
        """Whether a started, live worker waits on ``slot_id`` for the next lease
        (in ``environment``, where given)."""
        task = self._warm.get(slot_id)
        if environment is not None and self._warm_env.get(slot_id) != environment:
            return False
        return (task is not None and task.done() and not task.cancelled() and task.exception() is None
                and task.result().alive)

    def warm_environment(self, slot_id: SlotId) -> str | None:
        """The environment of ``slot_id``'s warm (or starting) worker, else None."""
        return self._warm_env.get(slot_id) if slot_id in self._warm else None

    def unknown_environment(self, name: str) -> str | None:
        """Why a lease cannot ask for environment ``name`` here (no such one), else None."""
        return self.environments.unknown(name)

    def cold_start(self, slot_ids: Sequence[SlotId], environment: str) -> str | None:
        """What a lease of ``slot_ids`` in a named ``environment`` is told when no
        worker of that environment is warm on them (it waits for one to start),
        else None."""
        if environment == DEFAULT_ENVIRONMENT or (len(slot_ids) == 1 and self.is_warm(slot_ids[0], environment)):
            return None
        seconds = self.environments.start_time(environment)
        took = f", ~{seconds:.0f} s" if seconds is not None else ""
        return f"starting a worker for environment {environment}{took}"

    def _taken_in(self, slot_id: SlotId, environment: str) -> asyncio.Task[Worker] | None:
        """:meth:`_taken`, where its worker runs ``environment``; another's is thrown away."""
        other = self._warm_env.get(slot_id) != environment
        task = self._taken(slot_id)
        if task is not None and other:
            asyncio.get_running_loop().create_task(self._discard(task))
            return None
        return task

    async def take(self, slot_ids: list[SlotId], user: str = "", tenant: Tenant | None = None,
                   environment: str = DEFAULT_ENVIRONMENT) -> Worker:
        """A started worker pinned to ``slot_ids`` running ``environment``, made
        ``user``'s; the slots' warm workers go. ``tenant``: the lease has its
        session folder already (a parked session resuming; ``user`` is then its user)."""
        self.environments.asked(environment)
        if tenant is not None:
            return await self._take_for(slot_ids, tenant, environment)
        started = time.monotonic()
        if len(slot_ids) == 1:
            slot_id = slot_ids[0]
            task = self._taken_in(slot_id, environment)
            if task is not None:
                found = Readiness.WARM if task.done() else Readiness.STARTING
                try:
                    worker = await task
                    if worker.alive:
                        self._took(slot_ids, found, started)
                        return await self._enter(worker, user)
                    await worker.kill()
                except Exception:
                    log.exception("warm worker for %s failed to start; starting another", slot_id)
            fresh = await self._start([self.slots[slot_id]], environment=environment)
            self._took(slot_ids, Readiness.COLD, started)
            return await self._enter(fresh, user)
        for slot_id in slot_ids:
            task = self._taken(slot_id)
            if task is not None:
                asyncio.get_running_loop().create_task(self._discard(task))
        fresh = await self._start([self.slots[s] for s in slot_ids], environment=environment)
        self._took(slot_ids, Readiness.COLD, started)
        return await self._enter(fresh, user)

    async def _take_for(self, slot_ids: list[SlotId], tenant: Tenant, environment: str) -> Worker:
        """A worker for ``tenant``'s lease in ``environment``: the slot's warm one
        where it can take the folder on, else a fresh one started for it."""
        started = time.monotonic()
        for slot_id in slot_ids:
            task = self._taken_in(slot_id, environment)
            if task is None:
                continue
            found = Readiness.WARM if task.done() else Readiness.STARTING
            worker = await self._settled(task)
            adopt = getattr(worker.process, "adopt", None) if worker is not None else None
            if worker is not None and len(slot_ids) == 1 and worker.alive and adopt is not None \
                    and adopt(tenant):
                self._took(slot_ids, found, started)
                return await self._enter(worker, tenant.user, new_lease=False)
            if worker is not None:
                await worker.kill()
        fresh = await self._start([self.slots[s] for s in slot_ids], tenant, environment)
        self._took(slot_ids, Readiness.COLD, started)
        return await self._enter(fresh, tenant.user, new_lease=False)

    async def _settled(self, task: asyncio.Task[Worker]) -> Worker | None:
        """The warm worker ``task`` started, or None if it failed to."""
        try:
            return await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            return None
        except Exception:
            log.warning("a warm worker failed to start; starting another", exc_info=True)
            return None

    async def _discard(self, task: asyncio.Task[Worker]) -> None:
        try:
            worker = await task
        except (asyncio.CancelledError, Exception):
            return
        await worker.kill()

    async def replace(self, worker: Worker, reason: str | None = None) -> Worker:
        """Kill ``worker`` and start a fresh one on the same slots (its session
        goes on, with the same user and session folder); its requests fail
        saying ``reason``. The fresh one starts once the old one's processes let
        go of the slots, or at the drain deadline (the slots are then draining:
        nobody else gets them once this session ends, until they are free)."""
        await worker.kill(reason)
        await self._settle(worker)
        tenant = worker.tenant
        fresh = await self._start(worker.slots, tenant, worker.environment)
        return await self._enter(fresh, tenant.user, new_lease=False) if tenant is not None else fresh

    async def recycle(self, worker: Worker, reason: str | None = None, keep_folder: bool = False) -> None:
        """Kill ``worker`` (every process it started), end its lease's session
        folder (unless ``keep_folder``: a parked session's), and warm fresh
        ones on its slots once its processes let go of them (a draining slot
        is warmed when it is drained)."""
        await worker.kill(reason)
        if not keep_folder:
            self.launcher.release(worker.tenant)
        draining = await self._settle(worker)
        for slot in worker.slots:
            if slot.id not in draining:
                self._warm_up(slot.id)

    async def close(self) -> None:
        """Stop warming, and kill every worker at once (a worker still starting is given up)."""
        self._closing = True
        tasks = list(self._warm.values())
        self._warm.clear()
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*(self._discard(task) for task in tasks), return_exceptions=True)
        await asyncio.gather(*(worker.kill() for worker in list(self._workers)), return_exceptions=True)
        await self.launcher.close()
