"""Where the client finds its server: arguments, then RGPU_URL / RGPU_TOKEN,
then the config file that ``rgpu up`` and ``rgpu login`` write.

The config file is JSON, ``{"url": ..., "token": ...}``, at
``$RGPU_CONFIG`` or ``client.json`` in the user's config directory, readable
by its owner only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import platformdirs

__all__ = ["DEFAULT_URL", "ClientConfig", "config_path", "notebook_path", "save_client_config"]

DEFAULT_URL = "ws://127.0.0.1:8765"


def config_path() -> Path:
    env = os.environ.get("RGPU_CONFIG")
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("remote-gpu-kernel")) / "client.json"


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    url: str = DEFAULT_URL
    token: str | None = None
    #: What a lease asks for unless told otherwise (RGPU_GPUS, RGPU_PRIORITY, RGPU_POOL).
    gpus: int = 1
    priority: str = "normal"
    pool: str = "default"

    @classmethod
    def load(cls, url: str | None = None, token: str | None = None) -> ClientConfig:
        """Arguments win over the environment, which wins over the file."""
        stored: dict[str, str] = {}
        path = config_path()
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = {}
        gpus = os.environ.get("RGPU_GPUS", "1")
        return cls(
            url=url or os.environ.get("RGPU_URL") or stored.get("url") or DEFAULT_URL,
            token=token or os.environ.get("RGPU_TOKEN") or stored.get("token"),
            gpus=int(gpus) if gpus.isdigit() and int(gpus) > 0 else 1,
            priority=os.environ.get("RGPU_PRIORITY") or "normal",
            pool=os.environ.get("RGPU_POOL") or "default",
        )


def notebook_path() -> str | None:
    """The notebook this kernel runs for, as Jupyter's server tells its kernels
    (``JPY_SESSION_NAME``, a path on the notebook's machine); None elsewhere."""
    return os.environ.get("JPY_SESSION_NAME") or None


def save_client_config(url: str, token: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    os.chmod(path, 0o600)
    return path
