"""The worker's own confinement (root only): a private mount namespace at
start, then the lease's identity for every thread, with no way back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remote_gpu_server.confinement import EnterSpec, SpawnSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root: run as root")

UID = 1_900_000_555

WORKER = r"""
import json, os, sys, threading, time
from remote_gpu_server.confinement import EnterSpec, SpawnSpec, enter, prepare

prepare(SpawnSpec.from_json(sys.argv[1]))
threads = [threading.Thread(target=time.sleep, args=(5,), daemon=True) for _ in range(3)]
for thread in threads:
    thread.start()
open('/tmp/written-inside', 'w').write('pre-lease')
os.makedirs('/tmp/.ipython/profile_default')
enter(EnterSpec.from_json(json.loads(sys.argv[2])))

def status(tid, key):
    for line in open(f'/proc/self/task/{tid}/status'):
        if line.startswith(key + ':'):
            return line.split()[1]

def reach(path):
    try:
        return open(path).read()
    except OSError as exc:
        return type(exc).__name__

tids = os.listdir('/proc/self/task')
print(json.dumps({
    'threads': len(tids),
    'uids': sorted({status(t, 'Uid') for t in tids}),
    'caps': sorted({status(t, 'CapEff') for t in tids}),
    'no_new_privs': status(tids[0], 'NoNewPrivs'),
    'groups': os.getgroups(),
    'cwd': os.getcwd(), 'home': os.environ['HOME'],
    'tmp': sorted(os.listdir('/tmp')),
    'exposed': reach(sys.argv[3] + '/exposed/file'),
    'sibling': reach(sys.argv[3] + '/secret'),
    'ipython_owner': os.stat('/tmp/.ipython/profile_default').st_uid,
}))
"""


def test_a_confined_worker_keeps_nothing_of_root(tmp_path: Path) -> None:
    closed = tmp_path / "closed"  # like /root: others cannot enter it
    (closed / "exposed").mkdir(parents=True)
    (closed / "exposed" / "file").write_text("the python it runs")
    (closed / "secret").write_text("the server's")
    closed.chmod(0o700)
    session = tmp_path / "session"
    session.mkdir()
    os.chown(session, UID, UID)
    host_marker = Path("/tmp") / f"host-only-{os.getpid()}"
    host_marker.write_text("host")
    spawn = SpawnSpec(private_tmp=True, tmp_size=64 << 20,
                      expose=((str(closed / "exposed"), False), (str(session), True)))
    entry = EnterSpec(cwd=str(session), uid=UID, gid=UID, env=(("HOME", str(session)),),
                      chown=("/tmp",))  # its contents, never what is bound into it
    try:
        out = subprocess.run([sys.executable, "-c", WORKER, spawn.to_json(), json.dumps(entry.to_json()),
                              str(closed)], capture_output=True, text=True, check=True, timeout=60).stdout
    finally:
        host_marker.unlink()
    facts = json.loads(out)
    assert facts["threads"] == 4 and facts["uids"] == [str(UID)] and facts["caps"] == ["0000000000000000"]
    assert facts["no_new_privs"] == "1" and facts["groups"] == []
    assert facts["cwd"] == facts["home"] == str(session)
    assert host_marker.name not in facts["tmp"] and "written-inside" in facts["tmp"]
    assert (facts["exposed"], facts["sibling"]) == ("the python it runs", "FileNotFoundError")
    assert facts["ipython_owner"] == UID
    assert not Path("/tmp/written-inside").exists()
    assert os.stat(tmp_path).st_uid == 0 and os.stat(closed).st_uid == 0  # bound in, not chowned


def test_a_failed_enter_leaves_the_worker_unusable_for_anyone(tmp_path: Path) -> None:
    entry = EnterSpec(cwd=str(tmp_path / "missing"), uid=UID, gid=UID)
    code = ("import json, sys\nfrom remote_gpu_server.confinement import EnterSpec, enter\n"
            "enter(EnterSpec.from_json(json.loads(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(entry.to_json())], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "FileNotFoundError" in done.stderr
