"""Where the client finds its server: arguments, then RGPU_URL / RGPU_TOKEN,
then the config file that ``rgpu up`` and ``rgpu login`` write.

The config file is JSON, ``{"url": ..., "token": ..., "cafile": ...,
"insecure": ...}`` (the last two optional), at ``$RGPU_CONFIG`` or
``client.json`` in the user's config directory, readable by its owner only.

TLS (see :mod:`remote_gpu_core.tls`): ``cafile`` is a CA's certificate, or
a self-signed server's own, trusted besides the system's CAs (argument, then
``RGPU_CA``, then the file). ``insecure`` allows a token over plain ``ws://``
to a host that is not loopback (argument, then ``RGPU_INSECURE=1``, then the
file, where it counts only for the URL saved with it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

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
    #: What a lease asks for unless told otherwise (RGPU_GPUS, RGPU_PRIORITY, RGPU_POOL, RGPU_ENV).
    gpus: int = 1
    priority: str = "normal"
    pool: str = "default"
    #: The Python environment of the lease's worker (``default``: the server's own).
    env: str = "default"
    #: A PEM file of CAs (or a self-signed server's certificate) to trust besides the system's.
    cafile: str | None = None
    #: Send the token over plain ws:// even to a host that is not loopback.
    insecure: bool = False

    @classmethod
    def load(cls, url: str | None = None, token: str | None = None, *,
             cafile: str | None = None, insecure: bool | None = None) -> ClientConfig:
        """Arguments win over the environment, which wins over the file."""
        stored: dict[str, Any] = {}
        path = config_path()
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = {}
        gpus = os.environ.get("RGPU_GPUS", "1")
        url = url or os.environ.get("RGPU_URL") or stored.get("url") or DEFAULT_URL
        if insecure is None:
            insecure = (_truthy(os.environ.get("RGPU_INSECURE"))
                        or (stored.get("insecure") is True and stored.get("url") == url))
        return cls(
            url=url,
            token=token or os.environ.get("RGPU_TOKEN") or stored.get("token"),
            gpus=int(gpus) if gpus.isdigit() and int(gpus) > 0 else 1,
            priority=os.environ.get("RGPU_PRIORITY") or "normal",
            pool=os.environ.get("RGPU_POOL") or "default",
            env=os.environ.get("RGPU_ENV") or "default",
            cafile=cafile or os.environ.get("RGPU_CA") or stored.get("cafile") or None,
            insecure=bool(insecure),
        )


def notebook_path() -> str | None:
    """The notebook this kernel runs for, as Jupyter's server tells its kernels
    (``JPY_SESSION_NAME``, a path on the notebook's machine); None elsewhere."""
    return os.environ.get("JPY_SESSION_NAME") or None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def save_client_config(url: str, token: str, *, cafile: str | None = None,
                       insecure: bool = False) -> Path:
    """Save the server, token and TLS settings for this user; ``cafile`` is saved absolute."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, object] = {"url": url, "token": token}
    if cafile:
        data["cafile"] = os.path.abspath(os.path.expanduser(cafile))
    if insecure:
        data["insecure"] = True
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.chmod(path, 0o600)
    return path
