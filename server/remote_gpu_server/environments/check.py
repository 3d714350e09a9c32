"""What a worker needs of an interpreter, and the check that it has it.

A worker runs ``python -m remote_gpu_server.worker_process.kernel`` with the
worker's own code on its path (see :mod:`.worker_code`); the rest comes
from the environment: Python itself (the project's ``requires-python``)
and the distributions in :data:`REQUIREMENTS`, which is what
:mod:`remote_gpu_core` and :mod:`remote_gpu_server.worker_process` import
(ipykernel brings IPython, jupyter_client, pyzmq, tornado and traitlets).

:func:`check_interpreter` runs the interpreter once, isolated (``-I``),
with a small probe of the standard library only, and compares what it
reports with the requirements; each problem says what is wrong and the
pip line that fixes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from remote_gpu_core import fingerprint

__all__ = ["KEY_PACKAGES", "MIN_PYTHON", "REQUIREMENTS", "EnvironmentCheck", "Requirement", "check_interpreter",
           "check_this_interpreter"]

#: The oldest Python a worker runs on (the project's ``requires-python``).
MIN_PYTHON = (3, 11)


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A distribution a worker imports, and the oldest release that works."""

    name: str
    minimum: str
    why: str

    @property
    def pip(self) -> str:
        return f"{self.name}>={self.minimum}"


#: The worker's requirements; the same floors as the server's in ``pyproject.toml``.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("ipykernel", "7.4", "the worker is an ipykernel (dispatch_shell(concurrent=...) since 7.4)"),
    Requirement("jupyter_client", "8.9", "the worker's channels (CurveZMQ keys since 8.9)"),
    Requirement("pyzmq", "25", "the worker's sockets"),
    Requirement("cloudpickle", "3.0", "variables pushed and pulled"),
    Requirement("xxhash", "3.5", "large buffers are named by their xxh3-128"),
    Requirement("zstandard", "0.23", "buffers compressed on slow links"),
    Requirement("cryptography", "47", "the sealed data channel of a worker on another host"),
)
#: Shown for each environment where installed (``rgpu envs``, ``/api/status``),
#: and compared with a notebook's (``rgpu env diff NAME``): the packages that cross most.
KEY_PACKAGES = fingerprint.KEY_PACKAGES

#: Run by the interpreter under check: the standard library only.
_PROBE = """
import importlib.metadata as md, json, os, sys
def version(name):
    try:
        return md.version(name)
    except Exception:
        return None
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "executable": sys.executable,
    "prefix": sys.prefix, "base_prefix": sys.base_prefix,
    "exec_prefix": sys.exec_prefix, "base_exec_prefix": sys.base_exec_prefix,
    "path": [p for p in sys.path if p],
    "packages": {name: version(name) for name in NAMES},
}))
"""


@dataclasses.dataclass(frozen=True)
class EnvironmentCheck:
    """What :func:`check_interpreter` found: ``problems`` is empty where a worker can run.

    ``info`` is the probe's report (None where the interpreter did not run).
    """

    python: str
    info: dict[str, Any] | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def version(self) -> str:
        return ".".join(str(n) for n in self.info["version"]) if self.info else "?"

    @property
    def packages(self) -> dict[str, str | None]:
        return dict(self.info["packages"]) if self.info else {}

    def report(self) -> str:
        """The check in words, one line per finding (what ``rgpu env check`` prints)."""
        if self.info is None:
            return "\n".join(self.problems)
        lines = [f"{self.python}: Python {self.version} ({self.info['prefix']})"]
        for req in REQUIREMENTS:
            found = self.packages.get(req.name)
            lines.append(f"  {req.name}: {found or 'missing'} (needs {req.minimum}+)")
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append("  ok: workers can run here" if self.ok else "  not ok: workers cannot run here")
        return "\n".join(lines)


def check_interpreter(python: str | os.PathLike[str], timeout: float = 60.0) -> EnvironmentCheck:
    """Run ``python`` and check it against the worker's requirements (blocks)."""
    shown = str(python)
    path = Path(python)
    if not path.is_absolute():
        return EnvironmentCheck(shown, None, (f"{shown}: give the interpreter's absolute path "
                                              "(for example /opt/envs/np1/bin/python)",))
    if not os.access(path, os.X_OK) or path.is_dir():
        return EnvironmentCheck(shown, None, (f"{shown} is not an interpreter that can be run: "
                                              "give the python of a virtual or conda environment",))
    script = f"NAMES = {_names()!r}\n{_PROBE}"
    try:
        done = subprocess.run([str(path), "-I", "-c", script], capture_output=True, text=True, timeout=timeout,
                              check=False, env={"PATH": os.environ.get("PATH", os.defpath)})
        info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return EnvironmentCheck(shown, None, (f"{shown} did not run as Python: {exc}",))
    if not info:
        error = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return EnvironmentCheck(shown, None, (f"{shown} did not run as Python: {error[0]}",))
    return EnvironmentCheck(shown, info, tuple(_problems(shown, info)))


def check_this_interpreter() -> EnvironmentCheck:
    """:func:`check_interpreter` of the running Python, without starting it again
    (the server's own, at each start)."""
    import importlib.metadata
    import sys

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "version": list(sys.version_info[:3]), "executable": sys.executable,
        "prefix": sys.prefix, "base_prefix": sys.base_prefix,
        "exec_prefix": sys.exec_prefix, "base_exec_prefix": sys.base_exec_prefix,
        "path": [p for p in sys.path if p],
        "packages": {name: version(name) for name in _names()},
    }
    return EnvironmentCheck(sys.executable, info, tuple(_problems(sys.executable, info)))


def _names() -> list[str]:
    return [r.name for r in REQUIREMENTS] + [k for k in KEY_PACKAGES if k not in {r.name for r in REQUIREMENTS}]


def _problems(python: str, info: dict[str, Any]) -> list[str]:
    problems = []
    major, minor = info["version"][:2]
    if (major, minor) < MIN_PYTHON:
        problems.append(f"Python {major}.{minor} is too old: workers need Python "
                        f"{'.'.join(map(str, MIN_PYTHON))} or later; make the environment with a newer Python")
    pip = f"{shlex.quote(python)} -m pip install"
    for req in REQUIREMENTS:
        found = info["packages"].get(req.name)
        if found is None:
            problems.append(f"{req.name} is missing ({req.why}): {pip} {shlex.quote(req.pip)}")
            continue
        try:
            old = Version(found) < Version(req.minimum)
        except InvalidVersion:
            old = False
        if old:
            problems.append(f"{req.name} {found} is older than {req.minimum} ({req.why}): "
                            f"{pip} -U {shlex.quote(req.pip)}")
    return problems
