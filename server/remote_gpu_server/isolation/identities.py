"""Which operating-system identity runs each user's workers (a root server).

``--run-as dynamic`` (the default) gives every token user a uid of their
own from a reserved range, the way systemd's ``DynamicUser`` does, with a
private group of the same number and no supplementary groups. The mapping is
kept in a JSON file next to the store (``<store>-uids.json``, mode 0600),
so a user keeps their uid across restarts and no two users ever share one.

``--run-as accounts`` runs a user's workers as the operating-system account
of the same name, with that account's groups, as Slurm and JupyterHub's
local spawner do, when that account exists and is a regular one (a uid
between ``UID_MIN`` and ``UID_MAX`` of ``/etc/login.defs``, 1000–60000 by
default: never root, a system account, or the server's own uid); other
users get a dynamic uid.

A dynamic uid is never 0, never the server's, never one that an account or
a group already has, and never one recorded for another user, by this
server or by any other on the host.
"""

from __future__ import annotations

import dataclasses
import enum
import grp
import json
import logging
import os
import pwd
import secrets
import stat
import tempfile
from pathlib import Path

from ..errors import IsolationError
from .uid_registry import UidRegistry

__all__ = ["DEFAULT_UID_RANGE", "Identities", "Identity", "RunAs", "parse_uid_range"]

log = logging.getLogger("remote_gpu_server")

#: Above the uids that /etc/subuid conventionally hands to rootless
#: containers (from 100000, 65536 each) and systemd to DynamicUser
#: (61184–65519), and below 2**31, which some tools take for negative.
DEFAULT_UID_RANGE = range(1_900_000_000, 1_900_100_000)


class RunAs(enum.Enum):
    DYNAMIC = "dynamic"
    ACCOUNTS = "accounts"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a user's worker runs as."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    #: The account's home folder (accounts only), else None.
    home: str | None = None
    #: The registry owner (see :mod:`.uid_registry`) that gave this dynamic
    #: uid, so a Ray node claims it on its own host too; None for an account.
    owner: str | None = None

    @property
    def account(self) -> bool:
        return self.home is not None


def parse_uid_range(text: str) -> range:
    """``START-END`` (both included) as a range; ValueError says what is wrong."""
    start, sep, end = text.partition("-")
    try:
        first, last = int(start), int(end)
    except ValueError:
        raise ValueError(f"--uid-range {text!r}: expected START-END, like 1900000000-1900099999") from None
    if not sep or first < 1000 or last < first or last >= 2**31 - 1:
        raise ValueError(f"--uid-range {text!r}: needs 1000 <= START <= END < 2147483647")
    return range(first, last + 1)


def _login_defs(path: Path = Path("/etc/login.defs")) -> tuple[int, int]:
    """``(UID_MIN, UID_MAX)`` of regular accounts."""
    values = {"UID_MIN": 1000, "UID_MAX": 60000}
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in values and parts[1].isdigit():
                values[parts[0]] = int(parts[1])
    except OSError:
        pass
    return values["UID_MIN"], values["UID_MAX"]


def _taken(uid: int) -> bool:
    """Whether an account or a group already has this number."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


class Identities:
    """The identity of each user; see the module docstring.

    ``path`` is the mapping file; ``registry`` the host's uid registry (see
    :mod:`.uid_registry`); ``server_uid`` the uid no worker may have. Raises
    IsolationError where the mapping cannot be trusted or one of its uids is
    another server's.
    """

    def __init__(self, path: Path, run_as: RunAs = RunAs.DYNAMIC, uid_range: range = DEFAULT_UID_RANGE,
                 server_uid: int | None = None, *, registry: Path) -> None:
        self.path = path
        self.run_as = run_as
        self.uid_range = uid_range
        self.server_uid = os.geteuid() if server_uid is None else server_uid
        self._regular = _login_defs()
        owner, self._uids = self._load()
        self.registry = UidRegistry(registry, owner or secrets.token_hex(16), path)
        if self._uids and owner is None:  # written before the registry: it needs its owner id
            self._save()
        self.registry.confirm(self._uids)
        self._cache: dict[str, Identity] = {}

    def _load(self) -> tuple[str | None, dict[str, int]]:
        """The mapping's owner id and recorded uids; refused if anyone but the
        server could have written them."""
        try:
            info = os.lstat(self.path)
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, {}
        except (OSError, ValueError) as exc:
            raise IsolationError(f"cannot read the uid mapping {self.path}: {exc}") from None
        if not stat.S_ISREG(info.st_mode) or info.st_uid != self.server_uid or info.st_mode & 0o022:
            raise IsolationError(f"{self.path} must be a file of the server's own that no one else "
                                 "may write")
        uids = {str(user): int(uid) for user, uid in dict(data.get("uids") or {}).items()}
        if len(set(uids.values())) != len(uids):
            raise IsolationError(f"{self.path} gives two users the same uid; fix or remove it")
        for user, uid in uids.items():  # an account's uid would hand its files to this user
            try:
                raise IsolationError(f"{self.path} maps {user} to uid {uid}, which is the account "
                                     f"{pwd.getpwuid(uid).pw_name}'s; fix or remove it")
            except KeyError:
                pass
        owner = data.get("owner")
        return (str(owner) if owner else None), uids

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".uids-", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"version": 1, "owner": self.registry.owner, "uids": self._uids}, out, indent=1,
                          sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def of(self, user: str) -> Identity:
        """``user``'s identity, allocating (and recording) a dynamic uid on first use."""
        identity = self._cache.get(user)
        if identity is None:
            identity = self._account(user) if self.run_as is RunAs.ACCOUNTS else None
            if identity is None:
                identity = self._dynamic(user)
            self._cache[user] = identity
        return identity

    def _account(self, user: str) -> Identity | None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        low, high = self._regular
        if not low <= entry.pw_uid <= high or entry.pw_uid == self.server_uid:
            log.warning("user %s: the account %s (uid %d) is not a regular account; "
                        "its workers get a dynamic uid", user, user, entry.pw_uid)
            return None
        groups = tuple(g for g in os.getgrouplist(user, entry.pw_gid) if g != 0)
        return Identity(user, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)

    def _dynamic(self, user: str) -> Identity:
        uid = self._uids.get(user)
        if uid is None:
            used = set(self._uids.values())
            uid = self.registry.allocate(
                user, self.uid_range,
                lambda candidate: candidate not in used and candidate != self.server_uid and not _taken(candidate))
            if uid is None:
                raise IsolationError(f"no free uid left in --uid-range "
                                     f"{self.uid_range.start}-{self.uid_range.stop - 1} for user {user} "
                                     f"(the registry {self.registry.path} holds every other server's too)")
            self._uids[user] = uid
            self._save()
            log.info("user %s runs as the dynamic uid %d", user, uid)
        if uid in (0, self.server_uid):
            raise IsolationError(f"{self.path} maps {user} to uid {uid}, which no worker may have")
        return Identity(user, uid, uid, owner=self.registry.owner)

    def adopt(self, identity: Identity) -> None:
        """Claim on this host the dynamic uid that another server (a Ray
        cluster's head) gave ``identity``'s user, before a worker here takes it;
        raises IsolationError where it is an account's or another server's here."""
        if identity.owner is None or identity.owner == self.registry.owner:
            return
        if identity.uid in (0, self.server_uid) or _taken(identity.uid):
            raise IsolationError(f"uid {identity.uid}, which the cluster's head gave {identity.user}, is "
                                 f"an account's or a group's on this node: give the head another --uid-range")
        UidRegistry(self.registry.path, identity.owner,
                    Path("(the mapping of the Ray cluster's head)")).confirm({identity.user: identity.uid})
