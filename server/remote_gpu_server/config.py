"""Server configuration: one dataclass, filled from CLI flags and RGPU_* variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import platformdirs

from .isolation.policy import IsolationConfig
from .connections.limits import Limits
from .sessions.parked import ParkConfig
from .scheduling.scheduler import PoolConfig, Quota, SchedulerConfig

__all__ = ["ServerConfig", "data_dir", "default_db_path", "named_paths", "parse_pool"]


def default_db_path() -> Path | str:
    """``$RGPU_DB`` (a file's path, or a ``postgresql://`` URL kept as it is) or
    ``rgpu.sqlite3`` in the user's data directory."""
    env = os.environ.get("RGPU_DB")
    if env:
        return env if "://" in env else Path(env)
    return Path(platformdirs.user_data_dir("remote-gpu-kernel")) / "rgpu.sqlite3"


def data_dir(db: Path | str) -> Path:
    """Where the server keeps its own files (certificates, session folders):
    beside a SQLite store, or the user's data directory when the store is a
    database server's URL."""
    if isinstance(db, str) and "://" in db:
        return Path(platformdirs.user_data_dir("remote-gpu-kernel"))
    return Path(db).parent


def named_paths(config: object) -> tuple[Path, ...]:
    """Every file or folder a configuration names: its ``Path`` values, at any
    depth of nested dataclasses and tuples. These are the server's own files
    (store, keys, registry, ...), which a worker's sandbox hides; a setting
    added later is hidden as well, without a list to keep up to date."""
    found: list[Path] = []

    def walk(value: object) -> None:
        if isinstance(value, Path):
            found.append(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(config)
    return tuple(found)


def parse_pool(spec: str) -> PoolConfig:
    """``--pool NAME=SLOT,SLOT[:idle=SECONDS][:max-gpus=N][:max-waiting=N][:park-after=SECONDS][:env=ENV+ENV]``.

    For example ``interactive=gpu0,gpu1:idle=900:max-gpus=1``; ``jax=2,3:env=jax``
    runs only the environment ``jax`` on GPUs 2 and 3 (a lease there that
    names no environment gets it). A pool may
    name no slot (``batch=:idle=900``): its settings then apply to the GPUs
    that Ray nodes put in it (``--resources '{"pool:batch": N}'``). Raises
    ValueError saying what is wrong.
    """
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--pool {spec!r}: expected NAME=SLOT,SLOT[:idle=SECONDS][:max-gpus=N]")
    slots, *options = rest.split(":")
    values: dict[str, float] = {}
    environments: tuple[str, ...] = ()
    for option in options:
        key, _, value = option.partition("=")
        if key == "env":
            environments = tuple(e.strip() for e in value.split("+") if e.strip())
            if not environments:
                raise ValueError(f"--pool {spec!r}: env needs an environment's name, like env=np1 or env=np1+np2")
            continue
        if key not in ("idle", "max-gpus", "max-waiting", "park-after"):
            raise ValueError(f"--pool {spec!r}: unknown option {key!r} (idle, max-gpus, max-waiting, park-after, "
                             "env)")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--pool {spec!r}: {key} needs a number") from None
    gpus, waiting = values.get("max-gpus"), values.get("max-waiting")
    park_after = values.get("park-after")
    if park_after is not None and not park_after > 0:
        raise ValueError(f"--pool {spec!r}: park-after needs a number of seconds above 0")
    return PoolConfig(
        name=name,
        slots=tuple(s.strip() for s in slots.split(",") if s.strip()),  # type: ignore[misc]
        idle_timeout=values.get("idle"),
        default_quota=Quota(None if gpus is None else int(gpus), None if waiting is None else int(waiting)),
        park_after=park_after,
        environments=environments,
    )


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: The store: a SQLite file's path, or a ``postgresql://`` URL.
    db: Path | str = dataclasses.field(default_factory=default_db_path)
    #: ``auto`` (NVML, else CPU slots), ``cpu:N`` or GPU indices ``0,1``.
    slots: str = "auto"
    #: A session with no request for this long is released.
    idle_timeout: float = 3600.0
    #: A session whose client disconnected is kept this long for a reconnect.
    grace: float = 60.0
    #: After the interrupt of a cell that timed out or was cancelled, how long
    #: before its worker is replaced (the stop ladder).
    kill_grace: float = 5.0
    #: The stop ladder: seconds between SIGTERM and SIGKILL to a worker's processes.
    term_grace: float = 5.0
    #: After a worker's kill, how long its processes may still hold its slots
    #: before the slots are marked draining (see :mod:`.drain`).
    drain_deadline: float = 10.0
    #: Seconds between two looks at a draining slot.
    drain_period: float = 2.0
    #: After an interrupt, how long before a cell that still runs is said to ignore interrupts.
    interrupt_notice: float = 3.0
    #: How long a worker may take to start.
    startup_timeout: float = 120.0
    #: Priorities, fair share, quotas and pools (see :mod:`.scheduler`).
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    #: Price of one GPU-hour (slot-hour) for usage reports; None shows no cost.
    price_per_gpu_hour: float | None = None
    #: ``--max-output``: bytes of one cell's output the journal keeps, as a head and
    #: a tail (see :mod:`.output_bound`); None keeps all of it.
    max_output: int | None = 16 << 20
    #: Prune the output journal of sessions released more than this many days
    #: ago (jobs and usage stay); None keeps every output.
    keep_output: float | None = None
    #: This server's name in a shared database (restart recovery takes only its
    #: own jobs); None: the host's name.
    server_id: str | None = None
    #: ``auto`` or ``host:port`` of a Ray cluster whose GPUs this server leases
    #: (it joins as the cluster's head); None: this machine's slots.
    ray: str | None = None
    #: TLS (see :mod:`.tls`): serve wss:// and https:// with this certificate
    #: and key (None: the key is in the certificate's file); None serves plain.
    certfile: Path | None = None
    keyfile: Path | None = None
    #: Browser origins allowed besides none (see :mod:`.origins`); ``*``: any.
    allow_origins: tuple[str, ...] = ()
    #: Who workers run as, what they can reach, their memory (see :mod:`.isolation`).
    isolation: IsolationConfig = dataclasses.field(default_factory=IsolationConfig)
    #: What one client may send and make the server hold (see :mod:`.limits`).
    limits: Limits = dataclasses.field(default_factory=Limits)
    #: Parking idle sessions (see :mod:`.parking`).
    parking: ParkConfig = dataclasses.field(default_factory=ParkConfig)
    #: ``--env NAME=PYTHON``: named environments besides the server's own
    #: Python, ``default`` (see :mod:`.environments`).
    environments: tuple[tuple[str, str], ...] = ()
