"""Who each user's workers run as: dynamic uids, recorded (per store, and
claimed in the host's registry), and accounts."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from remote_gpu_server.errors import IsolationError
from remote_gpu_server.isolation.identities import Identities, RunAs, parse_uid_range

NOBODY = 65534  # an account (and a group) on every Debian machine


def registry(tmp_path: Path) -> Path:
    """This test's uid registry (never the host's)."""
    return tmp_path / "registry" / "uids.json"


def test_dynamic_uids_are_distinct_recorded_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "rgpu.sqlite3-uids.json"
    ids = Identities(path, uid_range=range(1_900_000_100, 1_900_000_110), server_uid=os.geteuid(),
                     registry=registry(tmp_path))
    alice, bob = ids.of("alice"), ids.of("bob")
    assert alice.uid != bob.uid and {alice.uid, bob.uid} <= set(range(1_900_000_100, 1_900_000_110))
    assert (alice.gid, alice.groups, alice.account) == (alice.uid, (), False)
    assert ids.of("alice") == alice
    assert json.loads(path.read_text())["uids"] == {"alice": alice.uid, "bob": bob.uid}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identities(path, uid_range=range(1_900_000_100, 1_900_000_110), server_uid=os.geteuid(),
                     registry=registry(tmp_path))
    assert again.of("bob") == bob and again.of("carol").uid not in (alice.uid, bob.uid)


def test_a_dynamic_uid_is_never_an_account_a_group_or_the_servers(tmp_path: Path) -> None:
    server_uid = NOBODY + 1
    ids = Identities(tmp_path / "uids.json", uid_range=range(NOBODY, NOBODY + 3), server_uid=server_uid,
                      registry=registry(tmp_path))
    assert ids.of("alice").uid == NOBODY + 2  # nobody's and the server's are skipped
    with pytest.raises(IsolationError, match="no free uid left in --uid-range 65534-65536 for user bob"):
        ids.of("bob")


def test_a_mapping_that_gives_two_users_one_uid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "uids.json"
    path.write_text(json.dumps({"uids": {"alice": 1_900_000_100, "bob": 1_900_000_100}}))
    with pytest.raises(IsolationError, match="two users the same uid"):
        Identities(path, registry=registry(tmp_path))


def test_accounts_mode_uses_regular_accounts_only(tmp_path: Path) -> None:
    regular = next((p for p in pwd.getpwall() if 1000 <= p.pw_uid <= 60000), None)
    ids = Identities(tmp_path / "uids.json", RunAs.ACCOUNTS, uid_range=range(1_900_000_100, 1_900_000_110),
                     server_uid=os.geteuid(), registry=registry(tmp_path))
    for system in ("root", "nobody", "no-such-account-here"):  # root and nobody: not regular
        assert ids.of(system).uid in range(1_900_000_100, 1_900_000_110)
    if regular is None:
        pytest.skip("no regular account on this machine")
    identity = ids.of(regular.pw_name)
    assert (identity.uid, identity.gid, identity.home) == (regular.pw_uid, regular.pw_gid, regular.pw_dir)
    assert identity.account and 0 not in identity.groups
    assert set(identity.groups) == set(os.getgrouplist(regular.pw_name, regular.pw_gid)) - {0}


@pytest.mark.parametrize("text", ["1-", "x-y", "5000-4000", "0-100", "1900000000-2147483647"])
def test_bad_uid_ranges_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match="--uid-range"):
        parse_uid_range(text)
    assert parse_uid_range("2000-2009") == range(2000, 2010)


def test_a_mapping_anyone_else_could_write_or_that_names_an_account_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "uids.json"
    path.write_text(json.dumps({"uids": {"alice": 1_900_000_100}}))
    path.chmod(0o666)
    with pytest.raises(IsolationError, match="no one else may write"):
        Identities(path, server_uid=os.geteuid(), registry=registry(tmp_path))
    path.chmod(0o600)
    path.write_text(json.dumps({"uids": {"alice": NOBODY}}))
    with pytest.raises(IsolationError, match="which is the account nobody's"):
        Identities(path, server_uid=os.geteuid(), registry=registry(tmp_path))
