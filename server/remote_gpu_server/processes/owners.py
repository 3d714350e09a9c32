"""Which worker a process belongs to, on the node where both run.

NVML says which processes hold memory on a GPU, by pid; the GPU check
(:mod:`.gpu_fence`) needs to know whose they are. A process belongs to a
worker when, looked at the ways the stop ladder finds a worker's processes
(:mod:`.ladder`), it is one of them:

- it is the worker's main process or descends from it;
- it is in the worker's session (a worker's main process leads a session of
  its own: what its cells start stays in it unless they call ``setsid``);
- it is in the worker's cgroups, where it has any (nothing leaves them), or
  in a namespace of the worker's own (its mount namespace, as root);
- it carries the worker's mark in its environment (:data:`.ladder.MARK_VAR`),
  being of one of the worker's uids.

A process that is none of these belongs to no worker (another program of
the host's, or one that dropped every trace): None. Each look is cheap for
the common case (the worker's own main process); the environment is read
only when the rest did not tell. Runs in a thread (it reads ``/proc``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

from .ladder import MARK_VAR, Scope, in_namespaces

__all__ = ["owner", "scopes_of"]


def _in_cgroup(pid: int, group: Path) -> bool:
    try:
        return str(pid) in (group / "cgroup.procs").read_text().split()
    except OSError:
        return False


def _mark(proc: psutil.Process, uids: frozenset[int]) -> str | None:
    try:
        if uids and proc.uids().real not in uids:
            return None
        mark = proc.environ().get(MARK_VAR)
    except (psutil.Error, OSError):
        return None
    return mark


def owner(pid: int, scopes: Sequence[Scope]) -> int | None:
    """The main pid of the worker among ``scopes`` that process ``pid`` belongs to, or None."""
    roots = {s.root: s for s in scopes if s.root is not None}
    if pid in roots:
        return pid
    try:
        proc = psutil.Process(pid)
        ancestors = {p.pid for p in proc.parents()}
    except psutil.Error:
        return None  # gone: it holds nothing any more
    for root in roots:
        if root in ancestors:
            return root
    try:
        session = os.getsid(pid)
    except OSError:
        session = None
    if session in roots:
        return session
    for root, scope in roots.items():
        if any(_in_cgroup(pid, group) for group in scope.cgroups) or in_namespaces(pid, scope.namespaces):
            return root
    marked = [(root, s) for root, s in roots.items() if s.mark]
    if marked:
        for root, scope in marked:
            if _mark(proc, scope.uids) == scope.mark:
                return root
    return None


def scopes_of(roots: Iterable[int]) -> list[Scope]:
    """Scopes for workers known only by their main pids (a Ray node's, asked by
    the head): each with the mark its main process carries."""
    scopes = []
    for root in sorted(set(roots)):
        try:
            mark = psutil.Process(root).environ().get(MARK_VAR)
        except (psutil.Error, OSError):
            mark = None
        scopes.append(Scope(root, mark=mark))
    return scopes
