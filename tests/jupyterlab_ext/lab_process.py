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
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

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
        self.proc: subprocess.Popen[str] | None = None
        self._drainer: threading.Thread | None = None

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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={self.port}",
             "--ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={self.tmp / 'workspaces'}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
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

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
