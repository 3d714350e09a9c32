"""Real Python environments for the tests of named environments.

:func:`make_environments` makes two virtual environments from the project's
interpreter: ``np1``, with numpy 1.26.4 of its own from PyPI, and ``np2``,
with numpy 2.x. Each one's ``site-packages`` names the project's environment
in a ``.pth``, after its own packages, as a site layered over a shared
environment does: the worker's requirements (ipykernel and the rest) and
np2's numpy come from there, np1's own numpy first, so that making them
downloads one wheel, not the worker's whole stack. They are made once and
kept in a folder named by a hash of what is in them (the packages, the
interpreter's version), under ``$RGPU_TEST_ENVS`` or
``~/.cache/remote-gpu-kernel/test-envs``, so a rerun finds them ready. A
folder is complete once its ``ready`` file exists; one half made (a run that
was stopped) is made again. Both are made at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["ENVIRONMENTS", "cache_root", "make_environments"]

#: The environments: name and the packages of their own.
ENVIRONMENTS = {"np1": ("numpy==1.26.4",), "np2": ("numpy>=2,<3",)}


def cache_root() -> Path:
    return Path(os.environ.get("RGPU_TEST_ENVS") or Path.home() / ".cache" / "remote-gpu-kernel" / "test-envs")


def _key(packages: tuple[str, ...]) -> str:
    text = "\n".join([sys.version, "layered over", sysconfig.get_paths()["purelib"], *packages])
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
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        base = sysconfig.get_paths()["purelib"]  # the project's environment: the worker's requirements
        script = (f"{sys.executable} -m venv --without-pip {folder} && "
                  f"echo {base} > {folder}/lib/{version}/site-packages/zz_rgpu_test_base.pth && "
                  f"{sys.executable} -m pip --python {folder}/bin/python install -q --no-deps "
                  + " ".join(f"'{p}'" for p in packages))
        making.append((folder, subprocess.Popen(["sh", "-c", script])))
    for folder, process in making:
        if process.wait(timeout) != 0:
            raise RuntimeError(f"the test environment {folder} could not be made (pip's output above)")
        # Readable by the workers' uids, as an admin's environment in /opt would be.
        (folder / "ready").write_text("")
    for folder in {p.parent.parent for p in pythons.values()}:
        folder.chmod(0o755)
    return pythons
