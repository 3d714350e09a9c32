"""``rgpu``: run the GPU server, manage tokens, connect a notebook.

Server commands (``serve``, ``token``) need the server extra:
``pip install 'remote-gpu-kernel[server]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .cli_jobs import add_job_commands
from .config import ClientConfig, config_path, save_client_config

__all__ = ["main"]


def _server() -> Any:
    try:
        import remote_gpu_server
    except ImportError:
        sys.exit("rgpu: the server side is not installed: pip install 'remote-gpu-kernel[server]'")
    return remote_gpu_server


def _db(args: argparse.Namespace) -> Path:
    from remote_gpu_server.config import default_db_path

    return Path(args.db) if args.db else default_db_path()


_TOKEN_RE = re.compile(r"(Bearer\s+)?rgpu_[A-Za-z0-9_-]+")


def _redact_tokens(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if "rgpu_" in text or "Bearer" in text:
        record.msg, record.args = _TOKEN_RE.sub("[token redacted]", text), None
    return True


def parse_size(text: str) -> int:
    """``512``, ``64K``, ``500M``, ``2G`` (binary units) → bytes; argparse's type for sizes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "")
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (for example 500M or 2G)") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative")
    return int(size)


def cmd_serve(args: argparse.Namespace) -> int:
    _server()
    from remote_gpu_server.app import GpuServer
    from remote_gpu_server.config import ServerConfig

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # websockets logs handshake headers at debug level: never let a token
    # reach the log, whatever level the server runs at.
    # It also logs every HTTP request (the sidebar polls) at INFO: warnings only.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_tokens)
    from remote_gpu_server.config import parse_pool
    from remote_gpu_server.scheduler import Quota, SchedulerConfig

    try:
        scheduler = SchedulerConfig(
            half_life=args.half_life * 3600, max_wait=args.max_wait,
            default_quota=Quota(args.max_gpus, args.max_waiting),
            pools=tuple(parse_pool(spec) for spec in args.pool),
        )
    except ValueError as exc:
        sys.exit(f"rgpu serve: {exc}")
    config = ServerConfig(host=args.host, port=args.port, db=_db(args), slots=args.slots,
                          idle_timeout=args.idle_timeout, grace=args.grace,
                          price_per_gpu_hour=args.price_per_gpu_hour, scheduler=scheduler,
                          work_dir=Path(args.work_dir) if args.work_dir else None,
                          max_upload=args.max_upload)

    async def serve() -> None:
        server = GpuServer(config)
        try:
            await server.start()
        except ValueError as exc:
            sys.exit(f"rgpu serve: {exc}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            logging.getLogger("remote_gpu_server").info("shutting down")
            await server.close()

    asyncio.run(serve())
    return 0


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def cmd_token(args: argparse.Namespace) -> int:
    _server()
    from remote_gpu_server.errors import StoreError
    from remote_gpu_server.store import Store

    store = Store(_db(args))
    try:
        if args.token_cmd == "create":
            token_id, token = store.create_token(args.user, days=args.days, admin=args.admin,
                                                 max_gpus=args.max_gpus, max_waiting=args.max_waiting)
            print(token)
            print(f"token {token_id} for {args.user}: shown once, keep it secret", file=sys.stderr)
        elif args.token_cmd == "list":
            from rich.console import Console
            from rich.table import Table

            table = Table("id", "user", "admin", "created", "expires", "last used", "state")
            now = time.time()
            for t in store.list_tokens():
                state = ("revoked" if t.revoked else
                         "expired" if t.expires and t.expires < now else "active")
                table.add_row(str(t.id), t.user, "yes" if t.admin else "", _when(t.created),
                              _when(t.expires), _when(t.last_used), state)
            Console().print(table)
        elif args.token_cmd == "revoke":
            store.revoke_token(args.id)
            print(f"token {args.id} revoked")
    except StoreError as exc:
        print(f"rgpu token: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    path = save_client_config(args.url, args.token)
    print(f"saved the server URL and token to {path}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Start a local server on the embedded defaults and JupyterLab wired to it.

    Makes a token for this user unless the saved one works with this
    server's store, saves it where notebooks look, installs the Remote GPU
    kernelspec into this environment, and stops the server when JupyterLab
    exits.
    """
    _server()
    from remote_gpu_server.errors import TokenError
    from remote_gpu_server.store import Store

    from .kernelspec import install

    url = f"ws://127.0.0.1:{args.port}"
    config = ClientConfig.load(url=url)
    db = _db(args)
    store = Store(db)
    try:
        try:
            token = store.verify_token(config.token).id and config.token
        except TokenError:
            user = getpass.getuser() or "user"
            _, token = store.create_token(user)
            print(f"created a token for {user} and saved it to {config_path()}")
    finally:
        store.close()
    assert token is not None
    save_client_config(url, token)
    install(prefix=sys.prefix, url=url)
    server = subprocess.Popen([sys.executable, "-m", "remote_gpu_kernel.cli", "serve", "--port",
                               str(args.port), "--db", str(db), "--slots", args.slots])
    try:
        if not _wait_for_port(args.port, server):
            print(f"rgpu up: the GPU server did not start on port {args.port}", file=sys.stderr)
            return 1
        lab_args = args.lab_args[1:] if args.lab_args[:1] == ["--"] else list(args.lab_args)
        if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in lab_args:
            lab_args.append("--allow-root")  # containers and CI machines run as root
        lab = [sys.executable, "-m", "jupyter", "lab", *lab_args]
        print(f"GPU server on {url}; starting JupyterLab (the Remote GPU kernel, %load_ext "
              "remote_gpu_kernel and the Remote GPU sidebar are ready)")
        env = dict(os.environ, RGPU_URL=url, RGPU_TOKEN=token)
        return subprocess.call(lab, env=env)
    except KeyboardInterrupt:
        return 130
    finally:
        server.terminate()
        server.wait(30)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def cmd_kernel(args: argparse.Namespace) -> int:
    """``rgpu kernel install``: write the "Remote GPU" kernelspec, as ipykernel's installer does."""
    import errno

    from .kernelspec import install

    try:
        dest = install(user=args.user, prefix=args.prefix, kernel_name=args.name,
                       display_name=args.display_name, url=args.url, gpus=args.gpus,
                       priority=args.priority, pool=args.pool)
    except OSError as exc:
        if exc.errno != errno.EACCES:
            raise
        print(f"rgpu kernel install: {exc}", file=sys.stderr)
        if not args.user:
            print("Perhaps you want --user or --sys-prefix?", file=sys.stderr)
        return 1
    print(f"Installed kernelspec {args.name} in {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgpu", description="Remote GPU for Jupyter.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    db_help = "SQLite store (default: $RGPU_DB or rgpu.sqlite3 in the user's data directory)"

    p = sub.add_parser("serve", help="run the GPU server",
                       description="Run the GPU server: leases slots to notebooks over websockets.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--db", help=db_help)
    p.add_argument("--slots", default="auto",
                   help="auto (GPUs from NVML, else CPU slots), cpu:N, or GPU indices like 0,1")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="release a session after this long without a request (default 3600)")
    p.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                   help="keep a disconnected client's session this long (default 60)")
    p.add_argument("--price-per-gpu-hour", type=float, metavar="PRICE",
                   help="show the cost of GPU time in rgpu usage and /api/status")
    p.add_argument("--max-gpus", type=int, metavar="N",
                   help="default quota: most slots a user may hold and ask for at once (default: no limit)")
    p.add_argument("--max-waiting", type=int, metavar="N",
                   help="default quota: most lease requests a user may have waiting (default: no limit)")
    p.add_argument("--half-life", type=float, default=24.0, metavar="HOURS",
                   help="fair share: how fast past GPU time stops counting (default 24)")
    p.add_argument("--max-wait", type=float, default=4 * 3600.0, metavar="SECONDS",
                   help="aging: a request waiting this long goes before newer ones of any priority "
                        "(default 14400)")
    p.add_argument("--pool", action="append", default=[], metavar="NAME=SLOTS[:idle=S][:max-gpus=N]",
                   help="a named pool of slots with its own idle timeout and quota, e.g. "
                        "interactive=gpu0,gpu1:idle=900:max-gpus=1 (repeatable; unnamed slots "
                        "form the pool 'default')")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where each session's folder is made (default: a private temporary folder)")
    p.add_argument("--max-upload", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="the most one %%gpu upload may carry, in bytes or with K, M, G (default 1G; 0: no limit)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="create, list and revoke tokens")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="create a token for USER and print it once")
    c.add_argument("user")
    c.add_argument("--days", type=float, help="expire after N days (default: never)")
    c.add_argument("--admin", action="store_true", help="an admin token sees every user's jobs")
    c.add_argument("--max-gpus", type=int, metavar="N", help="this token's quota of slots held at once")
    c.add_argument("--max-waiting", type=int, metavar="N", help="this token's quota of waiting requests")
    c.add_argument("--db", help=db_help)
    c = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    c.add_argument("--db", help=db_help)
    c = tsub.add_parser("revoke", help="revoke token ID")
    c.add_argument("id", type=int)
    c.add_argument("--db", help=db_help)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("login", help="save a server URL and token for this user's notebooks")
    p.add_argument("url")
    p.add_argument("token")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("up", help="start a local server and JupyterLab wired to it")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--db", help=db_help)
    p.add_argument("--slots", default="auto")
    p.add_argument("lab_args", nargs=argparse.REMAINDER, help="arguments passed to jupyter lab")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("kernel", help="install the Remote GPU Jupyter kernel")
    ksub = p.add_subparsers(dest="kernel_cmd", required=True)
    c = ksub.add_parser("install", help="write the kernelspec where Jupyter finds it")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--sys-prefix", action="store_const", const=sys.prefix, dest="prefix",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", help="install into PREFIX/share/jupyter/kernels")
    c.add_argument("--name", default="remote-gpu", help="the kernelspec's name (default remote-gpu)")
    c.add_argument("--display-name", help='the name JupyterLab shows (default "Remote GPU")')
    c.add_argument("--url", help="the GPU server's URL, written into the spec as RGPU_URL")
    c.add_argument("--gpus", type=int, help="how many GPUs the kernel leases (default 1)")
    c.add_argument("--priority", choices=["high", "normal", "low"], help="its lease's priority")
    c.add_argument("--pool", help="the pool of GPUs it leases from")
    p.set_defaults(func=cmd_kernel)
    add_job_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
