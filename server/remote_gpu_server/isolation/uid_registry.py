"""The dynamic uids given out on this host, by every root server on it.

Each root server keeps its users' dynamic uids in its own mapping, beside
its store (:mod:`.identities`). Two servers on one host, each with its own
store, would otherwise both give their first user the first uid of the
range, and each of those users could then read and trace the other's
workers. So every root server on a host claims each dynamic uid in one
registry before it gives it to anyone:

- where: ``/var/lib/remote-gpu-kernel/uids.json`` (:data:`DEFAULT_PATH`;
  ``--uid-registry`` or ``RGPU_UID_REGISTRY`` moves it, for tests and for
  hosts where ``/var/lib`` is not kept), in a folder of root's that no one
  else may write, mode 0600;
- how: every read-and-change holds an exclusive ``flock`` on
  ``uids.json.lock`` beside it, and the file is replaced whole (written
  aside, synced, renamed), so servers that start at once never pick the
  same uid and a crash leaves the old or the new registry, never half;
- what: ``{uid: {"owner", "user", "mapping"}}``; the owner is the id kept
  in one server's mapping file (servers that share a store share it, and
  so share their users' uids, as they should), ``mapping`` that file's
  path, for messages.

A uid claimed here is never given by another owner, whatever
``--uid-range`` each server has: ranges may overlap, and then share what
is free. A claim is never given back (a user keeps their uid for good, as
in the mapping). A mapping that records a uid which another owner claims
here (two stores that both handed out the same uid before this registry
existed) stops that server's start, naming both files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import IsolationError

__all__ = ["DEFAULT_PATH", "UidRegistry", "default_path"]

#: Where root servers keep the registry unless told otherwise.
DEFAULT_PATH = Path("/var/lib/remote-gpu-kernel/uids.json")


def default_path() -> Path:
    """``$RGPU_UID_REGISTRY``, else :data:`DEFAULT_PATH`."""
    given = os.environ.get("RGPU_UID_REGISTRY")
    return Path(given) if given else DEFAULT_PATH


class UidRegistry:
    """The registry at ``path``, as seen by ``owner`` (the id in the mapping file
    ``mapping``). Its files must be this process's own (root's) and no one
    else's to write."""

    def __init__(self, path: Path, owner: str, mapping: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.owner = owner
        self.mapping = mapping

    def confirm(self, uids: dict[str, int]) -> None:
        """Claim what the mapping already records (``{user: uid}``); raises
        IsolationError where another owner holds one of them."""
        if not uids:
            return
        with self._locked() as claims:
            for user, uid in sorted(uids.items()):
                self._check(claims, user, uid)
                claims[str(uid)] = self._claim(user)

    def allocate(self, user: str, candidates: Iterable[int], usable: Callable[[int], bool]) -> int | None:
        """``user``'s uid: the one this owner claimed for them before (a mapping
        not saved after its claim), else the first of ``candidates`` that no one
        claimed and that ``usable`` accepts, now claimed; None if none is left."""
        with self._locked() as claims:
            for key, claim in claims.items():
                if claim.get("owner") == self.owner and claim.get("user") == user:
                    return int(key)
            for uid in candidates:
                if str(uid) not in claims and usable(uid):
                    claims[str(uid)] = self._claim(user)
                    return uid
        return None

    def _claim(self, user: str) -> dict[str, str]:
        return {"owner": self.owner, "user": user, "mapping": str(self.mapping)}

    def _check(self, claims: dict[str, Any], user: str, uid: int) -> None:
        claim = claims.get(str(uid))
        if claim is None or claim.get("owner") == self.owner:
            return
        raise IsolationError(
            f"uid {uid}, which {self.mapping} gives to {user}, is already the uid of "
            f"{claim.get('user')} of another server on this host (its mapping: {claim.get('mapping')}; "
            f"registry: {self.path}): two users would share it. Remove {user} from one of the two "
            "mappings while its server is stopped; that user then gets a new uid")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The claims, under the lock; saved when the block ends without an error
        and changed them."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_owned(folder, directory=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self._check_owned(self.lock_path, info=os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
            claims = self._load()
            before = json.dumps(claims, sort_keys=True)
            yield claims
            if json.dumps(claims, sort_keys=True) != before:
                self._save(claims)
        finally:
            os.close(fd)  # and with it the lock

    def _check_owned(self, path: Path, *, directory: bool = False, info: os.stat_result | None = None) -> None:
        info = info or os.lstat(path)
        kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
        if not kind_ok or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise IsolationError(f"the uid registry's {path} must be a {'folder' if directory else 'file'} "
                                 f"of uid {os.geteuid()}'s that no one else may write; fix or remove it")

    def _load(self) -> dict[str, Any]:
        try:
            self._check_owned(self.path)
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise IsolationError(f"cannot read the uid registry {self.path}: {exc}") from None
        claims = data.get("uids") if isinstance(data, dict) else None
        if not isinstance(claims, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in claims.items()):
            raise IsolationError(f"the uid registry {self.path} is not one this server wrote; fix or remove it")
        return claims

    def _save(self, claims: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".uids-", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"version": 1, "uids": claims}, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
