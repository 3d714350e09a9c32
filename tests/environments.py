"""Real Python environments for the tests of named environments.

:func:`make_environments` makes two virtual environments from the project's
interpreter, each with the worker's requirements from PyPI and its own
numpy: ``np1`` (numpy 1.26.4) and ``np2`` (numpy 2.x). They are made once
and kept in a folder named by a hash of what is in them (the requirements,
the interpreter's version), under ``$RGPU_TEST_ENVS`` or
``~/.cache/remote-gpu-kernel/test-envs``, so a rerun finds them ready. A
folder is complete once its ``ready`` file exists; one half made (a run
that was stopped) is made again. Both are made at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["ENVIRONMENTS", "WORKER_PACKAGES", "cache_root", "make_environments"]

#: What a worker needs (see remote_gpu_server.environments.check.REQUIREMENTS).
WORKER_PACKAGES = ("ipykernel>=7.4", "jupyter_client>=8.9", "pyzmq>=25", "cloudpickle>=3.0", "xxhash>=3.5",
                   "zstandard>=0.23", "cryptography>=47")
#: The environments: name and what besides the worker's packages.
ENVIRONMENTS = {"np1": ("numpy==1.26.4",), "np2": ("numpy>=2,<3",)}


def cache_root() -> Path:
    return Path(os.environ.get("RGPU_TEST_ENVS") or Path.home() / ".cache" / "remote-gpu-kernel" / "test-envs")


def _key(packages: tuple[str, ...]) -> str:
    text = "\n".join([sys.version, *WORKER_PACKAGES, *packages])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_environments(timeout: float = 900) -> dict[str, Path]:
    """The interpreter of each environment by name, made where missing (blocks)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    pythons: dict[str, Path] = {}
    making: list[tuple[Path, subprocess.Popen[bytes]]] = []
    for name, packages in ENVIRONMENTS.items():
        folder = root / f"{name}-{_key(packages)}"
        pythons[name] = folder / "bin" / "python"
        if (folder / "ready").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        script = (f"{sys.executable} -m venv {folder} && {folder}/bin/python -m pip install -q "
                  + " ".join(f"'{p}'" for p in (*WORKER_PACKAGES, *packages)))
        making.append((folder, subprocess.Popen(["sh", "-c", script])))
    for folder, process in making:
        if process.wait(timeout) != 0:
            raise RuntimeError(f"the test environment {folder} could not be made (pip's output above)")
        # Readable by the workers' uids, as an admin's environment in /opt would be.
        (folder / "ready").write_text("")
    for folder in {p.parent.parent for p in pythons.values()}:
        folder.chmod(0o755)
    return pythons
