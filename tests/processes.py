"""A child process whose output the test keeps, line by line.

The real server and the real JupyterLab in tests both run this way: stdout
and stderr go into :attr:`LoggedProcess.log` through a reader thread, and
:meth:`LoggedProcess.stop` ends the process with SIGTERM (Ctrl-C's path),
killing it if it does not exit, and closes the pipe.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable

__all__ = ["LoggedProcess"]


class LoggedProcess:
    def __init__(self, argv: list[str], env: dict[str, str],
                 on_line: Callable[[str], None] | None = None) -> None:
        self.log: list[str] = []
        self._on_line = on_line
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30) -> tuple[int, bool]:
        """SIGTERM, then SIGKILL after ``timeout``: ``(returncode, exited_on_sigterm)``."""
        clean = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
                self.proc.kill()
                self.proc.wait()
        self._reap()
        return self.proc.returncode, clean

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        self._drainer.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
