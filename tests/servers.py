"""Start a real GPU server for tests: ``rgpu serve`` in a subprocess.

The server listens on a free loopback port with CPU slots and a SQLite file
in a temporary folder (or the store ``db`` names: a file, or a
``postgresql://`` URL); :meth:`ServerProcess.token` makes tokens in that
store. ``launcher`` (an argv prefix) runs the server through another
program, and ``env`` adds to its environment. A root server claims its
users' uids in a registry of its own test's (``RGPU_UID_REGISTRY`` in
``tmp``), never in the host's; ``env`` may name a shared one.
:meth:`ServerProcess.stop` ends it with SIGTERM (the same path as Ctrl-C)
and fails the test if it does not exit.

Its warm workers import nothing before their lease (``--preload none``)
unless ``preload`` says otherwise (None: the server's default, torch): the
suite starts hundreds of workers, and a cell that needs torch imports it
(``server/test_preload.py`` tests the preload itself).

Session folders go under ``tmp`` (``sessions/``), a PostgreSQL store's too
(the server's default for one is the user's data folder, shared by every
test run), and so does the rest of what such a server keeps in the user's
data folder, its users' uids among them (``XDG_DATA_HOME`` is ``tmp/data``).
A root server mounts each user's disk there; what a server that was killed
left mounted is unmounted when :meth:`ServerProcess.stop` or
:meth:`ServerProcess.kill` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from processes import LoggedProcess
from stores import BlockingStore

__all__ = ["ServerProcess", "ray_head", "unmount_under"]

_LISTENING = re.compile(r"listening on (wss?://\S+) with (\d+) slot")
_READY = re.compile(r"warm pool ready")


class ServerProcess:
    def __init__(self, tmp: Path, slots: str = "cpu:2", *args: str, db: Path | str | None = None,
                 launcher: list[str] | None = None, env: dict[str, str] | None = None,
                 preload: str | None = "none") -> None:
        self.tmp = tmp
        self.launcher = list(launcher or [])
        self.db: Path | str = db or tmp / "rgpu.sqlite3"
        self.env = {"RGPU_UID_REGISTRY": str(tmp / "uid-registry" / "uids.json"),
                    **({"XDG_DATA_HOME": str(tmp / "data")} if "://" in str(self.db) else {}), **(env or {})}
        self.slots = slots
        self.args = list(args) if preload is None or "--preload" in args else [*args, "--preload", preload]
        self.url = ""
        self.log: list[str] = []
        self.process: LoggedProcess | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._listening = threading.Event()

    def token(self, user: str = "alice", *extra: str) -> str:
        """What ``rgpu token create USER --db DB *extra`` prints, made in this
        process: the suite makes hundreds, and a Python start each adds up
        (the command itself is tested in test_auth.py and test_store_cli.py)."""
        from remote_gpu_server.cli import add_token

        parser = argparse.ArgumentParser(prog="rgpu")
        add_token(parser.add_subparsers())
        args = parser.parse_args(["token", "create", user, "--db", str(self.db), *extra])
        store = BlockingStore(args.db)
        try:
            _, token = store.create_token(args.user, days=args.days, admin=args.admin, max_gpus=args.max_gpus,
                                          max_waiting=args.max_waiting)
        finally:
            store.close()
        return str(token)

    def start(self, wait_warm: bool = True, timeout: float = 90) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        for name in ("RGPU_URL", "RGPU_TOKEN"):
            env.pop(name, None)
        root = [] if "--session-root" in self.args or "://" not in str(self.db) else [
            "--session-root", str(self.tmp / "sessions")]
        self.process = LoggedProcess(
            [*self.launcher, sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", "0",
             "--db", str(self.db),
             "--slots", self.slots, "--log-level", "debug", *root, *self.args],
            env, on_line=self._watch,
        )
        self.proc = self.process.proc
        self.log = self.process.log
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        if wait_warm and not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("warm pool did not start:\n" + "".join(self.log))
        return self

    def _watch(self, line: str) -> None:
        found = _LISTENING.search(line)
        if found:
            self.url = found.group(1)
            self._listening.set()
        if _READY.search(line):
            self._ready.set()

    def wait_for_log(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.log):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matched {pattern!r}:\n" + "".join(self.log[-40:]))

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        code, clean = self.process.stop(timeout)
        unmount_under(self.tmp)
        if not clean:
            raise AssertionError("the server did not exit on SIGTERM:\n" + "".join(self.log[-40:]))
        return code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            unmount_under(self.tmp)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unmount_under(folder: Path) -> None:
    """Unmount (lazily, deepest first) whatever is mounted under ``folder`` in this
    mount namespace: the users' disks a killed server left behind."""
    if os.geteuid() != 0:
        return
    top = str(folder.resolve())
    with open("/proc/self/mountinfo") as info:
        targets = [line.split()[4].replace("\\040", " ") for line in info]
    for target in sorted((t for t in targets if t.startswith(top + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def ray_head(tmp: Path, ray_cluster: object) -> ServerProcess:
    """A server that is the head of ``ray_cluster`` (conftest's ``ray_cluster``), started."""
    address = getattr(ray_cluster, "address")
    return ServerProcess(tmp, "auto", "--ray", address, "--grace", "2").start(timeout=180)


@contextlib.contextmanager
def slow_link_url(url: str, rtt: float = 0.002, rate: float = 160e6) -> Iterator[str]:
    """A ``ws://`` URL that reaches the server at ``url`` across an emulated link
    (``bench/link.py``; at 160 Mbit/s 32 MiB take about 1.7 s: long enough for a
    transfer's progress to show, and a link only ever makes it slower)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from link import Link, LinkProcess

    host, _, port = url.removeprefix("ws://").rstrip("/").rpartition(":")
    with LinkProcess(Link(rtt=rtt, rate=rate)) as net:
        yield f"ws://127.0.0.1:{net.proxy(host, int(port))}"
