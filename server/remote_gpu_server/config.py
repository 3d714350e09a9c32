"""Server configuration: one dataclass, filled from CLI flags and RGPU_* variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import platformdirs

from .scheduler import PoolConfig, Quota, SchedulerConfig

__all__ = ["ServerConfig", "default_db_path", "parse_pool"]


def default_db_path() -> Path:
    """``$RGPU_DB`` or ``rgpu.sqlite3`` in the user's data directory."""
    env = os.environ.get("RGPU_DB")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("remote-gpu-kernel")) / "rgpu.sqlite3"


def parse_pool(spec: str) -> PoolConfig:
    """``--pool NAME=SLOT,SLOT[:idle=SECONDS][:max-gpus=N][:max-waiting=N]``.

    For example ``interactive=gpu0,gpu1:idle=900:max-gpus=1``. Raises
    ValueError saying what is wrong.
    """
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--pool {spec!r}: expected NAME=SLOT,SLOT[:idle=SECONDS][:max-gpus=N]")
    slots, *options = rest.split(":")
    values: dict[str, float] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("idle", "max-gpus", "max-waiting"):
            raise ValueError(f"--pool {spec!r}: unknown option {key!r} (idle, max-gpus, max-waiting)")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"--pool {spec!r}: {key} needs a number") from None
    gpus, waiting = values.get("max-gpus"), values.get("max-waiting")
    return PoolConfig(
        name=name,
        slots=tuple(s.strip() for s in slots.split(",") if s.strip()),  # type: ignore[misc]
        idle_timeout=values.get("idle"),
        default_quota=Quota(None if gpus is None else int(gpus), None if waiting is None else int(waiting)),
    )


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    db: Path = dataclasses.field(default_factory=default_db_path)
    #: ``auto`` (NVML, else CPU slots), ``cpu:N`` or GPU indices ``0,1``.
    slots: str = "auto"
    #: A session with no request for this long is released.
    idle_timeout: float = 3600.0
    #: A session whose client disconnected is kept this long for a reconnect.
    grace: float = 60.0
    #: After a cell's timeout interrupt, how long before its worker is killed.
    kill_grace: float = 5.0
    #: How long a worker may take to start.
    startup_timeout: float = 120.0
    #: Priorities, fair share, quotas and pools (see :mod:`.scheduler`).
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    #: Price of one GPU-hour (slot-hour) for usage reports; None shows no cost.
    price_per_gpu_hour: float | None = None
    #: Where each session's folder is made; None: a private temporary folder.
    work_dir: Path | None = None
    #: The most bytes one upload may carry (0: no limit).
    max_upload: int = 1 << 30
