"""The server's environments: ``default`` (its own Python) and the named ones.

``rgpu serve --env NAME=PYTHON`` (or ``RGPU_ENVS="NAME=PYTHON,..."``) names
an interpreter; :meth:`Environments.load` checks each one (see
:mod:`.check`) and refuses the server's start, saying why, where one fails.
An :class:`Environment` then holds what the launcher and the isolation need:
the interpreter, the folders it reads code from (bound read-only into
sandboxes, exposed read-only to workers with uids of their own), and what
``rgpu envs`` and ``/api/status`` show.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from remote_gpu_core.fingerprint import ABSENT, local_fingerprint

from ..isolation.user_sites import DEFAULT_ENVIRONMENT
from .check import KEY_PACKAGES, EnvironmentCheck, check_interpreter, check_this_interpreter

__all__ = ["DEFAULT_ENVIRONMENT", "Environment", "Environments", "parse_environment"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_environment(spec: str) -> tuple[str, str]:
    """``NAME=PYTHON`` as ``(name, python)``; raises ValueError saying what is wrong."""
    name, sep, python = spec.partition("=")
    name, python = name.strip(), python.strip()
    if not sep or not name or not python:
        raise ValueError(f"--env {spec!r}: expected NAME=PYTHON, e.g. np1=/opt/envs/np1/bin/python")
    if not _NAME.fullmatch(name):
        raise ValueError(f"--env {spec!r}: {name!r} is not an environment name (letters, digits, '_', '.', '-')")
    if name == DEFAULT_ENVIRONMENT:
        raise ValueError(f"--env {spec!r}: {DEFAULT_ENVIRONMENT!r} is the server's own Python; choose another name")
    return name, python


@dataclasses.dataclass(frozen=True)
class Environment:
    """A checked interpreter that workers run in."""

    name: str
    #: The interpreter as configured (what workers are started with).
    python: str
    #: Python's version, ``3.11.7``.
    version: str
    #: ``sys.prefix`` of the environment.
    prefix: str
    #: Every folder its Python reads code from (its prefixes, its ``sys.path``).
    paths: tuple[Path, ...]
    #: Versions of :data:`.check.KEY_PACKAGES` (None: not installed).
    packages: dict[str, str | None]
    #: The server's own Python: its workers find this project where the server does.
    own: bool = False

    @classmethod
    def from_check(cls, name: str, check: EnvironmentCheck, own: bool = False) -> Environment:
        assert check.info is not None
        info = check.info
        folders = {info[k] for k in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix")}
        folders.add(os.path.dirname(os.path.realpath(info["executable"])))
        folders |= {p for p in info["path"] if os.path.isabs(p) and os.path.exists(p)}
        paths = tuple(sorted({Path(p).resolve() for p in folders}))
        return cls(name, check.python, check.version, info["prefix"], paths,
                   {k: check.packages.get(k) for k in KEY_PACKAGES}, own)

    @property
    def bin(self) -> Path:
        """The folder of its interpreter (put first on its workers' ``PATH``)."""
        return Path(self.python).parent

    @property
    def fingerprint(self) -> dict[str, str]:
        """Its versions as a notebook's are compared with (see :mod:`remote_gpu_core.fingerprint`):
        ``rgpu env diff NAME``, and the environment a lease notice says matches."""
        if self.own:
            return dict(local_fingerprint())
        return {"python": ".".join(self.version.split(".")[:2]),
                **{k: self.packages.get(k) or ABSENT for k in KEY_PACKAGES}}

    def status_json(self) -> dict[str, Any]:
        return {"name": self.name, "python": self.python, "version": self.version, "prefix": self.prefix,
                "packages": {k: v for k, v in self.packages.items() if v is not None},
                "fingerprint": self.fingerprint}


class Environments:
    """The server's environments by name, ``default`` first."""

    def __init__(self, environments: Iterable[Environment]) -> None:
        self._by_name = {e.name: e for e in environments}
        if DEFAULT_ENVIRONMENT not in self._by_name:
            raise ValueError("the environments must include the server's own, 'default'")

    @classmethod
    def load(cls, named: Iterable[tuple[str, str]] = ()) -> Environments:
        """Check the server's own Python and each ``(name, python)``; raises
        ValueError naming every environment that fails and why (blocks)."""
        own = check_this_interpreter()
        if not own.ok:
            raise ValueError("the server's own Python cannot run workers: " + "; ".join(own.problems))
        found = [Environment.from_check(DEFAULT_ENVIRONMENT, own, own=True)]
        failed = []
        seen: set[str] = set()
        for name, python in named:
            if name in seen:
                raise ValueError(f"--env {name}: named twice")
            seen.add(name)
            check = check_interpreter(python)
            if check.ok:
                found.append(Environment.from_check(name, check))
            else:
                failed.append(f"environment {name} ({python}): " + "; ".join(check.problems))
        if failed:
            raise ValueError("; ".join(failed) + " (rgpu env check PYTHON explains)")
        return cls(found)

    @classmethod
    def only_default(cls) -> Environments:
        """The server's own Python only, unchecked (tests, a launcher made without a server)."""
        info = sys.version_info
        paths = (Path(sys.prefix),)
        return cls([Environment(DEFAULT_ENVIRONMENT, sys.executable, f"{info[0]}.{info[1]}.{info[2]}",
                                sys.prefix, paths, {}, own=True)])

    def __getitem__(self, name: str) -> Environment:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Environment]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def status_json(self) -> list[dict[str, Any]]:
        return [e.status_json() for e in self]
