"""Server configuration: one dataclass, filled from CLI flags and RGPU_* variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import platformdirs

__all__ = ["ServerConfig", "default_db_path"]


def default_db_path() -> Path:
    """``$RGPU_DB`` or ``rgpu.sqlite3`` in the user's data directory."""
    env = os.environ.get("RGPU_DB")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("remote-gpu-kernel")) / "rgpu.sqlite3"


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
    #: Price of one GPU-hour (slot-hour) for usage reports; None shows no cost.
    price_per_gpu_hour: float | None = None
