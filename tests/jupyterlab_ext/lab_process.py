"""Start a real JupyterLab for browser tests: ``jupyter lab`` in a subprocess.

It runs in a temporary root, config, data, settings and workspaces folder,
on a free loopback port with a known token, and with the environment the
test gives it (RGPU_URL, RGPU_TOKEN for its kernels and the sidebar's server
extension). The system's labextensions (the installed sidebar) are found as
usual.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from processes import LoggedProcess

__all__ = ["LabProcess"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabProcess:
    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        self.root = tmp / "notebooks"
        self.port = _free_port()
        self.token = os.urandom(16).hex()
        self.env = env
        self.log: list[str] = []
        self.process: LoggedProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def start(self, timeout: float = 120) -> LabProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        settings = self.tmp / "settings"
        # No "fetch Jupyter news?" toast over the page.
        notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True, exist_ok=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ, **self.env, PYTHONUNBUFFERED="1",
                   JUPYTER_CONFIG_DIR=str(self.tmp / "config"),
                   JUPYTER_RUNTIME_DIR=str(self.tmp / "runtime"))
        self.process = LoggedProcess(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
             "--ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={self.tmp / 'workspaces'}"],
            env,
        )
        self.log = self.process.log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError("jupyter lab exited:\n" + "".join(self.log))
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError("jupyter lab did not start:\n" + "".join(self.log))

    def stop(self, timeout: float = 30) -> None:
        if self.process is not None:
            self.process.stop(timeout)
