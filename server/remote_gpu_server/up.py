"""``rgpu up``: a GPU server on this machine and JupyterLab wired to it (``./run.sh``).

In order, it:

1. picks the server's port: ``--port``, else ``$RGPU_PORT``, each refused at
   once (before anything starts) when another program has it; else 8765, or
   the first free port after it, as JupyterLab does with its own;
2. makes this user a token in the server's store, unless the saved one works
   there, and installs the Remote GPU kernelspec into this environment;
3. starts ``rgpu serve`` in a session of its own and waits for it to write,
   on a pipe (``--ready-fd``), the URL it listens on: a server that cannot
   start says why and JupyterLab is not started;
4. saves that URL and the token where notebooks look, and starts JupyterLab
   with them in its environment and this environment's scripts folder first
   on its ``PATH``, so that ``rgpu`` works in JupyterLab's terminals;
5. stops the server once JupyterLab has exited.

Ctrl-C in the terminal reaches JupyterLab, which asks "Shut down this
Jupyter server (y/[n])?" itself, and not the server, which runs in a
session of its own: a cell keeps running until JupyterLab really stops. A
SIGTERM or SIGHUP to ``rgpu up`` is passed on to JupyterLab, with the same
ending. If ``rgpu up`` itself is killed (SIGKILL, an out-of-memory kill),
the server and JupyterLab get SIGTERM from the kernel (``PR_SET_PDEATHSIG``)
and stop as they would on a Ctrl-C: nothing is left holding the ports.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import os
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from remote_gpu_core.login import ClientConfig, config_path, save_client_config

from .errors import DatabaseUnavailable, SchemaTooNew, StoreError, TokenError, UpError

__all__ = ["DEFAULT_PORT", "PORT_TRIES", "UpError", "add_up_command", "choose_port", "cmd_up", "lab_environment"]

#: The GPU server's port unless told otherwise.
DEFAULT_PORT = 8765
#: How many ports after a taken default are tried (JupyterLab's own ``port_retries``).
PORT_TRIES = 50
#: How long the server may take to listen (it opens its store and starts its workers first).
START_TIMEOUT = 300.0
#: How long the server may take to stop after JupyterLab did.
STOP_TIMEOUT = 60.0
_HOST = "127.0.0.1"


def port_is_free(port: int, host: str = _HOST) -> bool:
    """Whether a server could listen on ``port`` now (as asyncio binds: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(requested: int | None, environ: dict[str, str] | None = None) -> tuple[int, str | None]:
    """``(port, note)``: the port to start the server on (0: any free one) and, when
    the default was taken, a line that says which port is used instead.

    ``requested`` (``--port``) wins over ``$RGPU_PORT``; either is refused with
    :class:`UpError` when it is taken or not a port.
    """
    env = os.environ if environ is None else environ
    where = "--port"
    if requested is None and env.get("RGPU_PORT", "").strip():
        where, text = "RGPU_PORT", env["RGPU_PORT"].strip()
        if not text.isdigit():
            raise UpError(f"RGPU_PORT={text!r} is not a port number")
        requested = int(text)
    if requested is not None:
        if not 0 <= requested <= 65535:
            raise UpError(f"{where} {requested} is not a port number (0 to 65535; 0 picks a free one)")
        if requested and not port_is_free(requested):
            raise UpError(f"port {requested} ({where}) is in use by another program on {_HOST}; "
                          "choose another, or 0 for any free one")
        return requested, None
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORT_TRIES):
        if port_is_free(port):
            return port, None if port == DEFAULT_PORT else (
                f"port {DEFAULT_PORT} is in use by another program; the GPU server takes {port}")
    return 0, f"ports {DEFAULT_PORT}-{DEFAULT_PORT + PORT_TRIES - 1} are in use; the GPU server takes a free one"


def lab_environment(url: str, token: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """JupyterLab's environment: the server and token for its kernels and sidebar,
    and this environment's scripts first on ``PATH`` for its terminals."""
    env = dict(os.environ if base is None else base, RGPU_URL=url, RGPU_TOKEN=token)
    scripts = sysconfig.get_path("scripts")
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != scripts]
    env["PATH"] = os.pathsep.join([scripts, *parts])
    if sys.prefix != sys.base_prefix:  # a virtual environment: say so, as activating it does
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def _db(arg: str | None) -> Path | str:
    from .config import default_db_path

    if not arg:
        return Path(default_db_path())
    return arg if "://" in arg else Path(arg)


def _usable_token(db: Path | str) -> str:
    """The saved token if this store knows it, else a new one for this user."""
    import asyncio

    from .store import Store

    saved = ClientConfig.load().token

    async def token() -> str:
        store = await Store.open(db)
        try:
            try:
                await store.verify_token(saved)
                assert saved is not None
                return saved
            except TokenError:
                user = getpass.getuser() or "user"
                _, made = await store.create_token(user)
                print(f"created a token for {user} and saved it to {config_path()}")
                return made
        finally:
            await store.close()

    return str(asyncio.run(token()))


#: ``prctl``'s option: the signal this process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


def _ends_with(parent: int) -> Callable[[], None]:
    """What a child of ``parent`` runs before it starts (``preexec_fn``): it gets
    SIGTERM once ``parent`` ends, and at once if ``parent`` ended already."""
    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return  # not Linux: the child may outlive a killed parent, as before
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def _start_server(port: int, db: Path | str, slots: str) -> tuple[subprocess.Popen[bytes], str]:
    """``rgpu serve`` in a session of its own (Ctrl-C in the terminal is JupyterLab's),
    and the URL it says it listens on; UpError if it never does."""
    read, write = os.pipe()
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port", str(port), "--db", str(db),
             "--slots", slots, "--ready-fd", str(write)],
            pass_fds=(write,), start_new_session=True,
            preexec_fn=_ends_with(os.getpid()))  # noqa: PLW1509 (rgpu up runs one thread)
    finally:
        os.close(write)
    try:
        url = _read_line(read, START_TIMEOUT)
    except BaseException:
        _stop(server)
        raise
    finally:
        os.close(read)
    if not url:
        code = _stop(server)
        raise UpError(f"the GPU server did not start (exit status {code}; its reason is above); "
                      "JupyterLab was not started")
    return server, url


def _read_line(fd: int, timeout: float) -> str:
    """The first line written to ``fd``; "" once every writer closed it, or after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1024)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode() if b"\n" in data else ""


def _stop(server: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the server's clean shutdown), SIGKILL after :data:`STOP_TIMEOUT` or a Ctrl-C."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_TIMEOUT)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            server.kill()
    return server.wait()


@contextlib.contextmanager
def _signals_for(lab: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """While JupyterLab runs: SIGINT is JupyterLab's (the terminal sends it there
    too), SIGTERM and SIGHUP are passed on to it."""
    def forward(signum: int, _frame: Any) -> None:
        if lab and lab[0].poll() is None:
            lab[0].send_signal(signum)

    def leave_to_lab(_signum: int, _frame: Any) -> None:
        pass

    handlers = {signal.SIGINT: leave_to_lab, signal.SIGTERM: forward, signal.SIGHUP: forward}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _install_kernel() -> None:
    """The Remote GPU kernelspec, in this Python's prefix: ``rgpu kernel install
    --sys-prefix``, the client's own command (the server never imports the client)."""
    done = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "kernel", "install", "--sys-prefix"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UpError(f"could not install the Remote GPU kernel: {done.stderr.strip() or done.stdout.strip()}")


def cmd_up(args: argparse.Namespace) -> int:
    """``rgpu up``; see the module docstring. Returns JupyterLab's exit status."""
    try:
        port, note = choose_port(args.port)
    except UpError as exc:
        print(f"rgpu up: {exc}", file=sys.stderr)
        return 1
    if note:
        print(f"rgpu up: {note}", file=sys.stderr)
    db = _db(args.db)
    try:
        token = _usable_token(db)
    except (DatabaseUnavailable, SchemaTooNew, StoreError) as exc:
        print(f"rgpu up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    # No URL in the spec: the kernels take the server's from JupyterLab's
    # environment, or from the saved config when JupyterLab is started otherwise.
    try:
        _install_kernel()
    except UpError as exc:
        print(f"rgpu up: {exc}", file=sys.stderr)
        return 1
    try:
        server, url = _start_server(port, db, args.slots)
    except UpError as exc:
        print(f"rgpu up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    lab: list[subprocess.Popen[bytes]] = []
    try:
        save_client_config(url, token)
        lab_args = args.lab_args[1:] if args.lab_args[:1] == ["--"] else list(args.lab_args)
        if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in lab_args:
            lab_args.append("--allow-root")  # containers and CI machines run as root
        print(f"GPU server on {url}; starting JupyterLab (the Remote GPU kernel, %load_ext "
              "remote_gpu_kernel and the Remote GPU sidebar are ready; rgpu is on its terminals' PATH)",
              flush=True)
        with _signals_for(lab):
            lab.append(subprocess.Popen([sys.executable, "-m", "jupyter", "lab", *lab_args],
                                        env=lab_environment(url, token),
                                        preexec_fn=_ends_with(os.getpid())))  # noqa: PLW1509 (one thread)
            code = lab[0].wait()
        return code
    except KeyboardInterrupt:  # before JupyterLab started
        return 130
    finally:
        if server.poll() is None:
            print(f"rgpu up: {'JupyterLab has stopped; ' if lab else ''}stopping the GPU server",
                  file=sys.stderr, flush=True)
        code = _stop(server)
        if code not in (0, -signal.SIGTERM):
            print(f"rgpu up: the GPU server ended with exit status {code}", file=sys.stderr)


def add_up_command(sub: Any, db_help: str) -> None:
    """Add ``rgpu up`` to ``rgpu``'s subparsers."""
    p = sub.add_parser("up", help="start a local server and JupyterLab wired to it",
                       description="Start a GPU server on this machine and JupyterLab wired to it; "
                                   "the server stops once JupyterLab has.")
    p.add_argument("--port", type=int, metavar="PORT",
                   help=f"the GPU server's port (default: $RGPU_PORT, else {DEFAULT_PORT} or the first "
                        "free port after it; 0 picks any free one)")
    p.add_argument("--db", help=db_help)
    p.add_argument("--slots", default="auto",
                   help="auto (GPUs from NVML, else CPU slots), cpu:N, or GPU indices like 0,1")
    p.add_argument("lab_args", nargs=argparse.REMAINDER,
                   help="arguments passed to jupyter lab (after --, for example: -- --no-browser)")
    p.set_defaults(func=cmd_up)
