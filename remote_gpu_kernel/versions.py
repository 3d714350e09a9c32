"""The notebook's end of "both ends match": what this Python has, and what differs.

A session's lease carries its worker's fingerprint (see
:mod:`remote_gpu_core.fingerprint`); :func:`mismatch` compares it with this
process's and says what differs in one line for the lease notice, and
nothing where the versions are the same. :func:`comparison` is the whole
table that ``rgpu env diff`` prints.

Tests cannot install another numpy into the worker for a minute, but they
can make the client *say* it has one: :func:`pretend_client_versions_for_tests`
changes what this process reports as its own versions, and nothing else
(never the worker's, never what a push carries); so does
:data:`PRETEND_VAR` in the environment of a process that a test starts (a
kernel).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from remote_gpu_core.fingerprint import (
    ABSENT, KEY_PACKAGES, PYTHON, UNKNOWN, describe, differences, local_fingerprint
)

__all__ = [
    "PRETEND_VAR",
    "client_fingerprint",
    "comparison",
    "matching_environment",
    "mismatch",
    "pretend_client_versions_for_tests",
    "table",
]

#: What the test hook makes this process say it has (see the module docstring).
_pretended: dict[str, str] = {}
#: The test hook for a process of its own: ``numpy=1.26.4,pandas=`` (empty:
#: not installed) is what it says it has.
PRETEND_VAR = "RGPU_TEST_PRETEND_CLIENT_VERSIONS"


def client_fingerprint() -> dict[str, str]:
    """This process's fingerprint (Python, :data:`KEY_PACKAGES`)."""
    pairs = (item.partition("=") for item in os.environ.get(PRETEND_VAR, "").split(",") if "=" in item)
    return {**local_fingerprint(), **{name.strip(): version.strip() for name, _, version in pairs}, **_pretended}


@contextlib.contextmanager
def pretend_client_versions_for_tests(**versions: str) -> Iterator[None]:
    """A test hook: this process reports ``versions`` (``numpy="1.0"``; ""
    for not installed) as its own fingerprint while the block runs."""
    saved = dict(_pretended)
    _pretended.update(versions)
    try:
        yield
    finally:
        _pretended.clear()
        _pretended.update(saved)


def matching_environment(here: Mapping[str, str], status: Mapping[str, Any], current: str) -> str | None:
    """The first other environment the server offers in which nothing of
    ``here`` differs, by the ``envs`` list of its ``/api/status`` (each
    ``{"name", "fingerprint"}``), or None (no such list, or none matches)."""
    envs = status.get("envs")
    if not isinstance(envs, list):
        return None
    for env in envs:
        if not isinstance(env, dict) or env.get("name") == current:
            continue
        theirs = env.get("fingerprint")
        if isinstance(theirs, dict) and isinstance(env.get("name"), str) and not differences(here, theirs):
            return str(env["name"])
    return None


def mismatch(remote: Mapping[str, str], environments: Mapping[str, Mapping[str, str]] | None = None) -> str | None:
    """One line for the lease notice saying what differs between this
    process and a worker whose fingerprint is ``remote``, naming an
    environment of ``environments`` (the server's, by name, from its
    Welcome) in which nothing differs where there is one; None where
    nothing differs (or the server did not say its versions)."""
    here = client_fingerprint()
    found = differences(here, remote)
    if not found:
        return None
    text = describe(found)
    match = next((name for name, theirs in (environments or {}).items() if not differences(here, theirs)), None)
    return f"{text}; environment `{match}` matches" if match else text


def comparison(remote: Mapping[str, str]) -> tuple[list[tuple[str, str, str, bool]], int]:
    """The rows of ``rgpu env diff``: ``(name, here, there, differs)`` for
    Python and every key package, and how many differ."""
    here = client_fingerprint()
    rows = []
    for name in (PYTHON, *KEY_PACKAGES, *sorted(set(here) - {PYTHON, *KEY_PACKAGES})):
        mine, theirs = here.get(name, ABSENT), remote.get(name)
        if theirs is None:
            theirs = UNKNOWN
        rows.append((name, mine, theirs, bool(differences({name: mine}, {name: theirs}))))
    return rows, sum(1 for row in rows if row[3])


def table(rows: Sequence[tuple[str, str, str, bool]], env: str) -> str:
    """``rgpu env diff``'s table: one line per row, ``!`` marking the differences."""
    shown = [("", "package", "here", f"server ({env})")] + [
        ("!" if differs else "", "Python" if name == PYTHON else name, mine or "-", theirs or "-")
        for name, mine, theirs, differs in rows]
    widths = [max(len(row[i]) for row in shown) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in shown)
