"""The worker's own confinement (root only): a private mount namespace at
start, then the lease's identity for every thread, with no way back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from remote_gpu_server.worker_process.confinement import EnterSpec, SpawnSpec
from remote_gpu_server.isolation.sandbox import python_paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root: run as root")

UID = 1_900_000_555

WORKER = r"""
import json, os, sys, threading, time
from remote_gpu_server.worker_process.confinement import EnterSpec, SpawnSpec, enter, prepare

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
    code = ("import json, sys\nfrom remote_gpu_server.worker_process.confinement import EnterSpec, enter\n"
            "enter(EnterSpec.from_json(json.loads(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(entry.to_json())], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "FileNotFoundError" in done.stderr


NAMESPACES = r"""
import ctypes, json, os, subprocess, sys, threading
from remote_gpu_server.worker_process.confinement import EnterSpec, SpawnSpec, enter, prepare

prepare(SpawnSpec.from_json(sys.argv[1]))
enter(EnterSpec.from_json(json.loads(sys.argv[2])))
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]

def call(result):
    return 'ok' if result >= 0 else os.strerror(ctypes.get_errno())

facts = {'ipc': os.readlink('/proc/self/ns/ipc'), 'user': os.readlink('/proc/self/ns/user'),
         'shm_small': call(libc.shmget(0, 16 << 20, 0o1600)),
         'shm_past_limit': call(libc.shmget(0, 128 << 20, 0o1600)),
         'unshare_tool': subprocess.run(['unshare', '-U', 'true'], capture_output=True, text=True).stderr.strip(),
         'subprocess': subprocess.run([sys.executable, '-c', 'print(1)'], capture_output=True, text=True).stdout}
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # a single-threaded child, as unshare(CLONE_NEWUSER) needs
    found = {'unshare': call(libc.unshare(0x10000000)),
             'clone3': call(libc.syscall(435, None, 0)),
             'x32_unshare': call(libc.syscall(272 | 0x40000000, 0x10000000))}
    os.write(write, json.dumps(found).encode())
    os._exit(0)
os.close(write)
facts.update(json.loads(os.read(read, 4096)))
os.waitpid(pid, 0)
thread = threading.Thread(target=facts.update, kwargs={'thread': 'ran'})
thread.start()
thread.join()
print(json.dumps(facts))
"""


def test_a_confined_worker_has_its_own_ipc_and_makes_no_user_namespace(tmp_path: Path) -> None:
    session = tmp_path / "session"
    session.mkdir()
    os.chown(session, UID, UID)
    python = tuple((str(p), False) for p in python_paths())  # it may live under /root
    spawn = SpawnSpec(private_tmp=True, private_ipc=True, ipc_limit=64 << 20, refuse_user_namespaces=True,
                      expose=(*python, (str(session), True)))
    entry = EnterSpec(cwd=str(session), uid=UID, gid=UID)
    done = subprocess.run([sys.executable, "-c", NAMESPACES, spawn.to_json(), json.dumps(entry.to_json())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["ipc"] != os.readlink("/proc/self/ns/ipc") and facts["user"] == os.readlink("/proc/self/ns/user")
    assert (facts["shm_small"], facts["shm_past_limit"]) == ("ok", "Invalid argument")  # held to ipc_limit
    assert facts["unshare_tool"] == "unshare: unshare failed: Operation not permitted"
    assert (facts["unshare"], facts["x32_unshare"]) == ("Operation not permitted",) * 2
    assert facts["clone3"] == "Function not implemented"  # the C library falls back to clone
    assert facts["subprocess"] == "1\n" and facts["thread"] == "ran"
