"""Run a command as an unprivileged uid, from a root test: the real server
as a user that is not root.

    python tests/server/unprivileged.py UID FOLDER -- COMMAND...

The uid needs no account. The Python of a test machine may live where
others cannot enter (``/root/.pyenv``); so, as a root server does for its
workers (:mod:`remote_gpu_server.worker_process.confinement`), this gives the command a
mount namespace of its own in which that Python and ``FOLDER`` (made the
uid's) are reachable and ``/tmp`` is private, then drops to the uid for
good and runs the command. A server that is not root then finds what any
server that is not root finds: no uid to change to, and bubblewrap if the
kernel allows user namespaces.
"""

from __future__ import annotations

import os
import sys

#: The unprivileged server's uid: outside --uid-range and every account.
SERVER_UID = 1_899_999_990


def launcher(folder: str, uid: int = SERVER_UID) -> list[str]:
    """The argv prefix that runs what follows it as ``uid``."""
    return [sys.executable, os.path.abspath(__file__), str(uid), folder, "--"]


def main() -> None:
    from remote_gpu_server.worker_process.confinement import SpawnSpec, prepare
    from remote_gpu_server.isolation.sandbox import python_paths

    uid, folder = int(sys.argv[1]), os.path.abspath(sys.argv[2])
    command = sys.argv[sys.argv.index("--") + 1:]
    for root, dirs, files in os.walk(folder):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, uid, uid, follow_symlinks=False)
    # More folders the command reads, never writes ($RGPU_TEST_EXPOSE, os.pathsep-separated):
    # a test's virtual environment beside its Python, say.
    more = [p for p in os.environ.get("RGPU_TEST_EXPOSE", "").split(os.pathsep) if p]
    expose = tuple((str(p), False) for p in [*python_paths(), *more]) + ((folder, True),)
    prepare(SpawnSpec(private_tmp=True, expose=expose))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    os.environ["HOME"] = folder
    os.chdir(folder)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
