"""The host's uid registry: servers with stores of their own never share a uid.

Each ``Identities`` here stands for one server (its own mapping beside its
own store); they share one registry in the test's folder, as the servers of
one host share ``/var/lib/remote-gpu-kernel/uids.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remote_gpu_server.errors import IsolationError
from remote_gpu_server.isolation.identities import Identities, Identity
from waiting import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the registry is root's: run as root")

RANGE = range(1_900_000_200, 1_900_000_210)


def server(tmp_path: Path, name: str, uid_range: range = RANGE) -> Identities:
    return Identities(tmp_path / name / "rgpu.sqlite3-uids.json", uid_range=uid_range,
                      registry=tmp_path / "registry" / "uids.json")


def claims(tmp_path: Path) -> dict[str, dict[str, str]]:
    return dict(json.loads((tmp_path / "registry" / "uids.json").read_text())["uids"])


def test_two_servers_never_give_out_one_uid_and_each_keeps_its_own(tmp_path: Path) -> None:
    one, two = server(tmp_path, "one"), server(tmp_path, "two", range(RANGE.start + 1, RANGE.stop + 5))
    alice, carol, bob = one.of("alice"), two.of("carol"), one.of("bob")
    assert alice.uid == RANGE.start and len({alice.uid, carol.uid, bob.uid}) == 3  # overlapping ranges share
    assert one.registry.owner != two.registry.owner
    again = server(tmp_path, "one")  # a restart keeps its owner id and its users' uids
    assert again.registry.owner == one.registry.owner and again.of("alice") == alice
    recorded = claims(tmp_path)
    assert {uid: c["user"] for uid, c in recorded.items()} == {
        str(alice.uid): "alice", str(carol.uid): "carol", str(bob.uid): "bob"}
    assert recorded[str(carol.uid)]["mapping"] == str(tmp_path / "two" / "rgpu.sqlite3-uids.json")
    assert (tmp_path / "registry" / "uids.json").stat().st_mode & 0o777 == 0o600


def test_a_full_range_says_the_registry_holds_the_other_servers_uids(tmp_path: Path) -> None:
    small = range(RANGE.start, RANGE.start + 1)
    server(tmp_path, "one", small).of("alice")
    with pytest.raises(IsolationError, match=r"no free uid left in --uid-range .* for user carol \(the registry"):
        server(tmp_path, "two", small).of("carol")


def test_a_mapping_whose_uid_another_server_holds_stops_the_start(tmp_path: Path) -> None:
    taken = server(tmp_path, "one").of("alice").uid
    legacy = tmp_path / "two" / "rgpu.sqlite3-uids.json"  # written before the registry existed
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"uids": {"bob": taken}}))
    legacy.chmod(0o600)
    with pytest.raises(IsolationError, match=f"uid {taken}, which {legacy} gives to bob, is already the uid of "
                                             "alice of another server on this host.*Remove bob"):
        server(tmp_path, "two")
    assert server(tmp_path, "one").of("alice").uid == taken  # the first server is untouched


def test_a_mapping_from_before_the_registry_gets_an_owner_and_claims_its_uids(tmp_path: Path) -> None:
    legacy = tmp_path / "one" / "rgpu.sqlite3-uids.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"uids": {"alice": RANGE.start + 3}}))
    legacy.chmod(0o600)
    ids = server(tmp_path, "one")
    assert json.loads(legacy.read_text())["owner"] == ids.registry.owner
    assert claims(tmp_path)[str(RANGE.start + 3)]["owner"] == ids.registry.owner
    assert server(tmp_path, "two").of("carol").uid == RANGE.start  # the claimed uid is skipped, not the first


def test_allocation_waits_for_the_lock_and_reads_the_registry_under_it(tmp_path: Path) -> None:
    server(tmp_path, "one")  # nothing claimed yet: no registry file is written
    assert not (tmp_path / "registry").exists()
    registry = tmp_path / "registry" / "uids.json"
    registry.parent.mkdir(mode=0o700)
    lock = os.open(registry.with_name("uids.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        code = ("import sys; from pathlib import Path; from remote_gpu_server.isolation.identities import Identities\n"
                f"ids = Identities(Path(sys.argv[1]), uid_range=range({RANGE.start}, {RANGE.stop}), "
                "registry=Path(sys.argv[2]))\nprint(ids.of('carol').uid)")
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "two" / "uids.json"), str(registry)],
                                 stdout=subprocess.PIPE, text=True)
        inode = os.fstat(lock).st_ino
        wait_for(lambda: any(line.split()[1] == "->" and line.split()[-3].endswith(f":{inode}")
                             for line in Path("/proc/locks").read_text().splitlines()),
                 what="the second server to wait for the registry's lock")
        # Another server claims the first uid while the lock is held.
        registry.write_text(json.dumps({"version": 1, "uids": {str(RANGE.start): {
            "owner": "another", "user": "alice", "mapping": "elsewhere"}}}))
        registry.chmod(0o600)
    finally:
        os.close(lock)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and int(out) == RANGE.start + 1


def test_a_registry_others_could_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    folder.mkdir(mode=0o700)
    folder.chmod(0o777)
    with pytest.raises(IsolationError, match="registry's .* must be a folder of uid 0's that no one else may write"):
        server(tmp_path, "one").of("alice")
    folder.chmod(0o700)
    (folder / "uids.json").write_text("{}")
    (folder / "uids.json").chmod(0o666)
    with pytest.raises(IsolationError, match="must be a file of uid 0's"):
        server(tmp_path, "one").of("alice")


def test_a_node_claims_the_uid_its_head_gave_on_its_own_host(tmp_path: Path) -> None:
    head = server(tmp_path / "head", "head").of("alice")  # the head's host has a registry of its own
    node = server(tmp_path, "node")
    node.adopt(head)
    assert claims(tmp_path)[str(head.uid)]["owner"] == head.owner
    local = server(tmp_path, "local").of("carol")  # a server of the node's host skips it
    assert local.uid != head.uid
    clash = Identity("bob", local.uid, local.uid, owner="another-head")
    with pytest.raises(IsolationError, match=f"uid {local.uid}.*already the uid of carol"):
        node.adopt(clash)
    nobody = Identity("bob", 65534, 65534, owner="another-head")
    with pytest.raises(IsolationError, match="an account's or a group's on this node"):
        node.adopt(nobody)
