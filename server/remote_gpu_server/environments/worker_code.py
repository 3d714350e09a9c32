"""The worker's own code in a folder of its own, for named environments.

A named environment's interpreter does not have this project installed, and
should not: its workers find :mod:`remote_gpu_core` and
:mod:`remote_gpu_server.worker_process` (all a worker imports of ours; the
import contracts in ``pyproject.toml`` keep it so) in a folder that holds a
copy of just those, put first on their ``PYTHONPATH``. Nothing else of the
server's is there: not its other packages, and not its environment's
site-packages, which would shadow the environment's own numpy or torch.

The folder is made once per server, readable by every worker (mode 0755
folders, 0644 files, owned by the server's user: no worker can change it)
and removed at the server's end. The top-level ``remote_gpu_server`` package
is a copy of its ``__init__.py``, which imports nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["WorkerCode"]

_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


class WorkerCode:
    """Call :meth:`close` at the end; :attr:`folder` goes first on the workers' path."""

    def __init__(self, parent: Path | None = None) -> None:
        import remote_gpu_core
        import remote_gpu_server
        import remote_gpu_server.worker_process

        self._top = Path(tempfile.mkdtemp(prefix="rgpu-worker-code-", dir=parent))
        self.folder = self._top / "lib"
        try:
            core = Path(remote_gpu_core.__path__[0])
            server = Path(remote_gpu_server.__path__[0])
            worker = Path(remote_gpu_server.worker_process.__path__[0])
            shutil.copytree(core, self.folder / "remote_gpu_core", ignore=_SKIP)
            (self.folder / "remote_gpu_server").mkdir()
            shutil.copy2(server / "__init__.py", self.folder / "remote_gpu_server" / "__init__.py")
            shutil.copytree(worker, self.folder / "remote_gpu_server" / "worker_process", ignore=_SKIP)
            _read_only(self._top)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for root, dirs, _files in os.walk(self._top):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        os.chmod(self._top, 0o755)
        shutil.rmtree(self._top, ignore_errors=True)


def _read_only(top: Path) -> None:
    """Everything readable by all and writable by no one (not even its owner,
    so that a slip in the server does not change what workers run)."""
    for root, dirs, files in os.walk(top, topdown=False):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o555)
    os.chmod(top, 0o555)
