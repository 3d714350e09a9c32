"""What keeps the users of a Ray cluster apart: Ray's token authentication,
and each node's isolation of workers.

A cell runs on a Ray node. Could it reach the cluster's GCS or a raylet as
a client, it would run code as the raylet's user on every node and read
what the head sends its actors (each worker's connection key, CurveZMQ
secret and data-channel certificate). Ray's token authentication
(``RAY_AUTH_MODE=token``, Ray 2.52 and later) refuses every caller that
does not present the cluster's token, so it is the fence, held in three
places:

- The head asks the GCS, from a process that has no token, whether it is
  refused (:func:`probe_cluster`). A cluster that lets it in cannot keep
  users apart: the server then serves one user only, as a server that
  cannot isolate does, unless it was started with ``--no-isolation``.
- The token never reaches a worker. Its environment is an allow-list that
  never passes ``RAY_AUTH_*`` (:mod:`.isolation`); in a sandbox the token's
  file is hidden (:func:`token_files`); a worker that runs as another uid
  can read it only where its permissions let others, which the node
  reports (:func:`token_exposure`).
- Each node reports how it would isolate workers (:class:`NodeReport`,
  made there by :class:`~.ray_host.NodeAgent`); a head that isolates
  leaves out a node that cannot, or whose token file others can read
  (:func:`refusal`, :class:`NodeReports`), and ``/api/status`` says why.

Where Ray looks for the token (its documented order): ``RAY_AUTH_TOKEN``
itself, else the file ``RAY_AUTH_TOKEN_PATH`` names, else
``~/.ray/auth_token`` of the user that runs Ray.

This module imports Ray only inside the functions that need it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..isolation.modes import IsolationMode

__all__ = ["AUTH_MODE_VAR", "ClusterAuth", "NodeReport", "NodeReports", "probe_cluster", "refusal",
           "token_exposure", "token_files", "uses_token"]

#: Ray's switch: ``token`` turns token authentication on for a process.
AUTH_MODE_VAR = "RAY_AUTH_MODE"
#: The token itself, or the file that holds it.
TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
#: How long one probe of the GCS may take.
PROBE_TIMEOUT = 60.0

# Run in a process with no token: a GCS that checks tokens refuses GcsClient's first call.
_PROBE = """\
import sys
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    print("refused")
else:
    print("accepted")
"""


@dataclasses.dataclass(frozen=True)
class ClusterAuth:
    """What :func:`probe_cluster` found out."""

    #: The GCS refused a caller without the token.
    required: bool
    #: Why the cluster does not keep users apart (None where it requires the token).
    problem: str | None = None
    #: The GCS answered (else it was unreachable or too busy, and counts as letting callers in).
    answered: bool = True


async def probe_cluster(address: str, tries: int = 1) -> ClusterAuth:
    """Ask the GCS at ``address`` (``HOST:PORT``) for its cluster id from a
    process that has no token and token authentication off; where the answer
    is neither a refusal nor an id (the GCS is busy), ask again, ``tries`` times
    in all. Undecided, the cluster counts as one that lets callers in."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_VAR, TOKEN_PATH_VAR)}
    env[AUTH_MODE_VAR] = "disabled"
    problem = ""
    for _ in range(tries):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE, address, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT)
        except TimeoutError:
            problem = f"no answer in {PROBE_TIMEOUT:.0f} s"
            continue
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        answer = out.decode().strip()
        if answer == "refused":
            return ClusterAuth(True)
        if answer == "accepted":
            return ClusterAuth(False, f"the Ray cluster at {address} does not require Ray's token "
                                      "authentication, so any cell could run code on every node as Ray's user "
                                      f"(start the cluster with {AUTH_MODE_VAR}=token: see the README, Many GPU "
                                      "machines behind one server)")
        problem = (err.decode().strip().splitlines() or [f"exit status {process.returncode}"])[-1]
    return ClusterAuth(False, f"could not tell whether the Ray cluster at {address} requires Ray's token "
                              f"authentication ({problem})", answered=False)


def uses_token(address: str) -> bool:
    """Whether ``ray.init(address=address)`` in this process presents a token
    (where an explicit address is given, only with ``RAY_AUTH_MODE=token``)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if address == "auto":  # ray.init turns it on where a token is found, as here
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return is_token_auth_enabled()


def token_files(environ: Mapping[str, str] | None = None, home: Path | None = None) -> tuple[Path, ...]:
    """The file Ray reads this process's token from, where it is one that exists
    (none where ``RAY_AUTH_TOKEN`` holds the token itself)."""
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_VAR):
        return ()
    named = environ.get(TOKEN_PATH_VAR)
    path = Path(named) if named else (home or Path.home()) / ".ray" / "auth_token"
    return (path,) if path.is_file() else ()


def token_exposure(path: Path) -> str | None:
    """Why users other than the file's owner could read the token in ``path``,
    or None where they cannot (no read bit for group or others, or a folder
    on the way that neither lets in)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & 0o044:
        return None
    for folder in path.resolve().parents:
        if not os.stat(folder).st_mode & 0o011:
            return None
    return (f"its Ray token file {path} can be read by other users (mode {mode:04o}), so its workers could "
            f"join the cluster: chmod 600 {path}, then restart Ray there")


@dataclasses.dataclass(frozen=True)
class NodeReport:
    """How a node would isolate the workers the head starts there."""

    #: The :class:`~.isolation.IsolationMode` it would use, by value.
    mode: str
    #: Why not a stronger one ("" where it isolates).
    reason: str
    #: The uid Ray runs as there (every worker's, where it cannot isolate).
    uid: int
    #: Its Ray presents and checks the cluster's token.
    token_auth: bool
    #: Why its workers could read Ray's token, or None.
    exposed: str | None = None


def refusal(report: NodeReport, *, isolate: bool) -> str | None:
    """Why a head that isolates workers (``isolate``) must not use a node that
    reported ``report``; None where it may."""
    if not isolate:
        return None
    if report.mode == IsolationMode.NONE.value:
        return (f"it cannot isolate workers ({report.reason}): every user's code would run there as "
                f"uid {report.uid}; run Ray there as root, or install bubblewrap, then restart Ray there")
    return report.exposed


class NodeReports:
    """What the head heard from each node, and which nodes it uses: with
    ``isolate`` (the head isolates workers), none that :func:`refusal` refuses."""

    def __init__(self, isolate: bool) -> None:
        self.isolate = isolate
        self._reports: dict[str, tuple[NodeReport, str | None]] = {}

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._reports

    def add(self, node_id: str, report: NodeReport) -> str | None:
        """Record ``report``; why the node is left out, or None where it is used."""
        refused = refusal(report, isolate=self.isolate)
        self._reports[node_id] = (report, refused)
        return refused

    def uses(self, node_id: str) -> bool:
        """Whether the node reported, and may run the head's workers."""
        reported = self._reports.get(node_id)
        return reported is not None and reported[1] is None

    def keep(self, node_ids: Iterable[str]) -> None:
        """Forget every node but these (the others went away)."""
        kept = set(node_ids)
        for node_id in set(self._reports) - kept:
            del self._reports[node_id]

    def as_json(self, label: Callable[[str], str]) -> list[dict[str, Any]]:
        """Each node as ``/api/status`` shows it, named by ``label``."""
        return [{"node": label(node_id), "mode": report.mode, "uid": report.uid, "token_auth": report.token_auth,
                 "used": refused is None, "problem": refused}
                for node_id, (report, refused) in self._reports.items()]
