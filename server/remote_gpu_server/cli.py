"""The server's ``rgpu`` commands: ``serve``, ``token`` and ``up``.

``rgpu`` (:mod:`remote_gpu_kernel.cli`) finds them through the entry point
``rgpu.commands`` of this package (:func:`add_serve`, :func:`add_token`, :func:`add_up`), so the client
never imports the server. Everything heavy is imported when a command
runs, not when ``rgpu`` builds its parser.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .up import add_up_command

__all__ = ["DB_HELP", "add_serve", "add_token", "add_up", "cmd_serve", "cmd_token"]

#: ``--db``'s help, the same for every command that takes it.
DB_HELP = ("the store: a SQLite file, or postgresql://USER@HOST/DB "
           "(default: $RGPU_DB, else rgpu.sqlite3 in the user's data directory)")


def _store_errors() -> tuple[type[Exception], ...]:
    """What opening a store raises when it cannot be used: the message says why."""
    from .errors import DatabaseUnavailable, SchemaTooNew, StoreError

    return DatabaseUnavailable, SchemaTooNew, StoreError


def _db(args: argparse.Namespace) -> Path | str:
    """``--db``: a SQLite file's path or a ``postgresql://`` URL (default: ``$RGPU_DB``, else a file)."""
    from .config import default_db_path

    if not args.db:
        return default_db_path()
    return str(args.db) if "://" in str(args.db) else Path(args.db)


_TOKEN_RE = re.compile(r"(Bearer\s+)?rgpu_[A-Za-z0-9_-]+")


def _redact_tokens(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    if "rgpu_" in text or "Bearer" in text:
        record.msg, record.args = _TOKEN_RE.sub("[token redacted]", text), None
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import GpuServer
    from .config import ServerConfig

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    # websockets logs handshake headers at debug level: never let a token
    # reach the log, whatever level the server runs at.
    # It also logs every HTTP request (the sidebar polls) at INFO: warnings only.
    logging.getLogger("websockets").setLevel(max(level, logging.WARNING))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact_tokens)
    from .config import parse_pool
    from .isolation.devices import test_device_root
    from .errors import IsolationError
    from .isolation.identities import DEFAULT_UID_RANGE, RunAs, parse_uid_range
    from .isolation.policy import IsolationConfig
    from .connections.limits import Limits
    from .frontdoor.origins import OriginPolicy
    from .sessions.parked import ParkConfig
    from .scheduling.scheduler import Quota, SchedulerConfig

    try:
        scheduler = SchedulerConfig(
            half_life=args.half_life * 3600, max_wait=args.max_wait,
            default_quota=Quota(args.max_gpus, args.max_waiting),
            pools=tuple(parse_pool(spec) for spec in args.pool),
        )
        OriginPolicy(args.allow_origin)
        certfile, keyfile = _serve_tls(args)
        isolation = IsolationConfig(
            run_as=RunAs(args.run_as), no_isolation=args.no_isolation, worker_memory=args.worker_memory,
            worker_pids=args.worker_pids,
            session_root=Path(args.session_root) if args.session_root else None,
            session_disk=args.session_disk,
            uid_range=parse_uid_range(args.uid_range) if args.uid_range else DEFAULT_UID_RANGE,
            uid_registry=_uid_registry(args), worker_env=tuple(args.worker_env),
            worker_pip_settings=not args.no_worker_pip_settings, preload=_preload(args.preload),
            device_root=test_device_root())
        limits = Limits(max_push=_bytes("--max-push", args.max_push),
                        max_upload=_bytes("--max-upload", args.max_upload),
                        max_message=_bytes("--max-message", args.max_message, 64 << 10),
                        max_requests=args.max_requests, max_connections=args.max_connections_per_user,
                        connection_memory=_bytes("--connection-memory", args.connection_memory, 1 << 20),
                        session_cache=_session_cache(args.session_cache),
                        bulk_stream=not args.no_bulk_stream)
        parking = ParkConfig(park_after=args.park_after,
                             quota=_size("--park-quota", args.park_quota, 0, "a park quota"),
                             keep=args.park_keep * 86400)
        max_output = _size("--max-output", args.max_output, 4 << 10, "one cell's output")
        from .environments import parse_environment

        environments = tuple(parse_environment(spec) for spec in _env_specs(args.env))
    except ValueError as exc:
        sys.exit(f"rgpu serve: {exc}")
    if args.keep_output is not None and not args.keep_output > 0:
        sys.exit("rgpu serve: --keep-output needs a number of days above 0")
    for flag in ("kill_grace", "term_grace", "drain_deadline"):
        if getattr(args, flag) < 0:
            sys.exit(f"rgpu serve: --{flag.replace('_', '-')} needs a number of seconds, 0 or more")
    config = ServerConfig(host=args.host, port=args.port, db=_db(args), slots=args.slots,
                          idle_timeout=args.idle_timeout, grace=args.grace, kill_grace=args.kill_grace,
                          term_grace=args.term_grace, drain_deadline=args.drain_deadline,
                          price_per_gpu_hour=args.price_per_gpu_hour, scheduler=scheduler,
                          server_id=args.server_id, keep_output=args.keep_output, ray=args.ray,
                          certfile=certfile, keyfile=keyfile, allow_origins=tuple(args.allow_origin),
                          isolation=isolation, limits=limits, parking=parking, max_output=max_output,
                          environments=environments)

    refused: tuple[type[Exception], ...] = (ValueError, RuntimeError, IsolationError, *_store_errors())

    async def serve() -> None:
        server = GpuServer(config)
        try:
            await server.start()
        except refused as exc:
            await server.close()
            sys.exit(f"rgpu serve: {exc}")
        except OSError as exc:  # the port: taken, or not ours to take
            await server.close()
            sys.exit(f"rgpu serve: {_listen_error(exc, config.host, config.port)}")
        if args.ready_fd is not None:
            _say_ready(args.ready_fd, "wss" if certfile else "ws", config.host, server.port)
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


def _size(flag: str, text: str, minimum: int, what: str = "", allow_none: bool = True) -> int | None:
    """A size flag's bytes (None for ``none`` where ``allow_none``); ValueError naming the flag."""
    from remote_gpu_core.sizes import parse_size

    try:
        return parse_size(text, minimum=minimum, what=what, allow_none=allow_none)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _bytes(flag: str, text: str, minimum: int = 1) -> int:
    """A size flag that must be a size (``none`` is not one)."""
    size = _size(flag, text, minimum, allow_none=False)
    assert size is not None
    return size


def _preload(text: str | None) -> tuple[str, ...] | None:
    """``--preload``: the module names; None for the worker's default."""
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if names in ((), ("none",)):
        return ()
    bad = [name for name in names if not all(part.isidentifier() for part in name.split("."))]
    if bad:
        raise ValueError(f"--preload: {', '.join(bad)} is not a module name (give names like torch,pandas, or none)")
    return names


def _session_cache(text: str) -> int | None:
    """``--session-cache``: None for ``auto``, 0 for ``none``, else its bytes."""
    if text.strip().lower() == "auto":
        return None
    return _size("--session-cache", text, 0) or 0


def _listen_error(exc: OSError, host: str, port: int) -> str:
    """Why the server could not start, where it was its port: what to do instead."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is in use by another program; choose another with --port "
                "(--port 0 picks a free one)")
    if exc.errno == errno.EACCES:
        return f"may not listen on port {port} on {host} ({exc.strerror}); choose a port above 1023 with --port"
    return str(exc)


def _say_ready(fd: int, scheme: str, host: str, port: int) -> None:
    """``--ready-fd``: write the URL the server listens on, and a newline, then close ``fd``."""
    shown = f"[{host}]" if ":" in host else host
    try:
        os.write(fd, f"{scheme}://{shown}:{port}\n".encode())
        os.close(fd)
    except OSError:  # whoever asked is gone; the server serves anyway
        logging.getLogger("remote_gpu_server").warning("could not write the URL to --ready-fd %d", fd)


def _serve_tls(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """``rgpu serve``'s certificate and key: given, self-signed (made once), or none."""
    if args.tls == "self-signed":
        if args.certfile or args.keyfile:
            raise ValueError("--tls self-signed makes its own certificate: leave out --certfile "
                             "and --keyfile, or leave out --tls")
        from .config import data_dir
        from .certificates import self_signed

        made = self_signed(data_dir(_db(args)) / "tls", args.host)
        when = "made now" if made.created else "made earlier, reused"
        print(f"TLS: self-signed certificate {made.certfile} ({when}) for {', '.join(made.names)}\n"
              f"TLS: its SHA-256 fingerprint is {made.fingerprint}\n"
              f"TLS: clients trust it with --cafile PATH or RGPU_CA=PATH, PATH a copy of "
              f"{made.certfile} (never of {made.keyfile.name})", flush=True)
        return made.certfile, made.keyfile
    if args.keyfile and not args.certfile:
        raise ValueError("--keyfile needs --certfile")
    return (Path(args.certfile) if args.certfile else None,
            Path(args.keyfile) if args.keyfile else None)


def _uid_registry(args: argparse.Namespace) -> Path:
    """``--uid-registry``, else ``$RGPU_UID_REGISTRY``, else the host's (``/var/lib/...``)."""
    from .isolation.uid_registry import default_path

    return Path(args.uid_registry) if args.uid_registry else default_path()


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def cmd_token(args: argparse.Namespace) -> int:
    return asyncio.run(_token(args))


async def _token(args: argparse.Namespace) -> int:
    from .errors import StoreError
    from .store import Store

    try:
        store = await Store.open(_db(args))
    except _store_errors() as exc:
        print(f"rgpu token: {exc}", file=sys.stderr)
        return 1
    try:
        if args.token_cmd == "create":
            token_id, token = await store.create_token(args.user, days=args.days, admin=args.admin,
                                                       max_gpus=args.max_gpus, max_waiting=args.max_waiting)
            print(token)
            print(f"token {token_id} for {args.user}: shown once, keep it secret", file=sys.stderr)
        elif args.token_cmd == "list":
            from rich.console import Console
            from rich.table import Table

            table = Table("id", "user", "admin", "created", "expires", "last used", "state")
            now = time.time()
            for t in await store.list_tokens():
                state = ("revoked" if t.revoked else
                         "expired" if t.expires and t.expires < now else "active")
                table.add_row(str(t.id), t.user, "yes" if t.admin else "", _when(t.created),
                              _when(t.expires), _when(t.last_used), state)
            Console().print(table)
        elif args.token_cmd == "revoke":
            await store.revoke_token(args.id)
            print(f"token {args.id} revoked")
    except StoreError as exc:
        print(f"rgpu token: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def add_serve(sub: Any) -> None:
    """Add ``rgpu serve`` to ``rgpu``'s subparsers (an entry point)."""
    p = sub.add_parser("serve", help="run the GPU server",
                       description="Run the GPU server: leases slots to notebooks over websockets.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--slots", default="auto",
                   help="auto (GPUs from NVML, else CPU slots), cpu:N, or GPU indices like 0,1")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="release a session after this long without a request (default 3600)")
    p.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                   help="keep a disconnected client's session this long (default 60)")
    p.add_argument("--preload", default=os.environ.get("RGPU_PRELOAD"), metavar="MODULES",
                   help="modules each warm worker imports before it is leased, so that a user's "
                        "first cell does not wait for them, comma-separated, like torch,pandas; none: "
                        "nothing (a worker starts sooner and holds less memory while it waits). "
                        "Default: $RGPU_PRELOAD, else torch where it is installed; a worker that "
                        "imports torch also initialises CUDA when it sees a GPU")
    stop = p.add_argument_group("stopping cells and workers (see README: Interrupts, stuck cells and causes of death)")
    stop.add_argument("--kill-grace", type=float, default=5.0, metavar="SECONDS",
                      help="a cell past its --timeout, or cancelled, is interrupted first; if it still "
                           "runs this long after, its worker is replaced (default 5)")
    stop.add_argument("--term-grace", type=float, default=5.0, metavar="SECONDS",
                      help="replacing a worker sends SIGTERM to every process it started, then SIGKILL "
                           "after this long (default 5)")
    stop.add_argument("--drain-deadline", type=float, default=10.0, metavar="SECONDS",
                      help="a slot goes back to the pool once no process of its killed worker holds it; "
                           "one still held after this long is marked draining until it is free "
                           "(default 10)")
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
    p.add_argument("--pool", action="append", default=[],
                   metavar="NAME=SLOTS[:idle=S][:max-gpus=N][:park-after=S][:env=ENV+ENV]",
                   help="a named pool of slots with its own idle timeout, quota, park-after and "
                        "environments, e.g. interactive=gpu0,gpu1:idle=900:max-gpus=1:park-after=600 or "
                        "jax=2,3:env=jax (its slots run only those --env environments; a lease there that "
                        "names none gets the first) (repeatable; unnamed slots form the pool 'default')")
    p.add_argument("--env", action="append", default=[], metavar="NAME=PYTHON",
                   help="a named environment: workers of leases that ask for NAME run PYTHON, the "
                        "interpreter of a virtual or conda environment that has the worker's "
                        "requirements (rgpu env check PYTHON says); repeatable; default: "
                        "$RGPU_ENVS (NAME=PYTHON,...). The server's own Python is 'default'; "
                        "not with --ray")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="lease the GPUs of every node of a running Ray cluster (auto, or HOST:PORT of "
                        "its head): this server becomes the cluster's head; needs "
                        "pip install 'remote-gpu-kernel[ray]', and RAY_AUTH_MODE=token with the "
                        "cluster's token to serve more than one user")
    p.add_argument("--keep-output", type=float, metavar="DAYS",
                   help="delete the output of sessions and jobs that ended more than DAYS ago, in the "
                        "background; jobs and usage totals stay (default: keep all output)")
    p.add_argument("--max-output", default="16M", metavar="SIZE",
                   help="keep at most this much of one cell's output in the store (its first and last "
                        "halves, and a line saying how much was left out); the client still gets all of "
                        "it as it comes (default 16M; none: keep everything)")
    p.add_argument("--server-id", metavar="NAME",
                   help="this server's name in a shared database: a restart recovers only the jobs of "
                        "the same name (default: the host's name)")
    p.add_argument("--certfile", metavar="PATH",
                   help="serve wss:// and https:// with this PEM certificate (chain)")
    p.add_argument("--keyfile", metavar="PATH",
                   help="the certificate's PEM private key (default: in the --certfile)")
    p.add_argument("--tls", choices=["self-signed"],
                   help="self-signed: make a key and certificate once under the store's folder "
                        "(tls/), reuse them after, and print the certificate's SHA-256 fingerprint")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (scheme://host[:port]) use the server; "
                        "repeatable; '*' allows any (default: none; clients that send no Origin "
                        "are never affected)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--ready-fd", type=int, metavar="FD",
                   help="once listening, write the server's URL and a newline to this inherited file "
                        "descriptor and close it (for a program that starts the server, as rgpu up does)")
    park = p.add_argument_group("parking idle sessions (see README: Parking a session)")
    park.add_argument("--park-after", type=float, metavar="SECONDS",
                      help="park a session idle this long: its variables go to disk on this machine and "
                           "its GPU back to the queue; its next cell restores them (a pool's park-after "
                           "overrides it; default: only when asked, with %%gpu park)")
    park.add_argument("--park-quota", default="none", metavar="SIZE",
                      help="disk each user's parked sessions may take, like 20G or 500M "
                           "(default: none, no limit)")
    park.add_argument("--park-keep", type=float, default=7.0, metavar="DAYS",
                      help="release a session parked longer than this; its files go (default 7)")
    iso = p.add_argument_group("isolation of workers (see README: Deploying for a team)")
    iso.add_argument("--run-as", choices=["dynamic", "accounts"], default="dynamic",
                     help="as root: run each user's workers as a uid of their own from --uid-range "
                          "(dynamic, the default), or as the OS account of the same name where a "
                          "regular one exists (accounts)")
    iso.add_argument("--uid-range", metavar="START-END",
                     help="the uids for --run-as dynamic (default 1900000000-1900099999); other "
                          "servers on this host may share the range: each uid goes to one of them")
    iso.add_argument("--uid-registry", metavar="PATH",
                     help="the file where every root server on this host claims the dynamic uids it "
                          "gives out, under a lock, so that no two servers give out one uid (default: "
                          "$RGPU_UID_REGISTRY, else /var/lib/remote-gpu-kernel/uids.json); servers "
                          "that are to stay apart must share it")
    iso.add_argument("--no-isolation", action="store_true",
                     help="where workers cannot be isolated (not root, no bubblewrap), or a --ray "
                          "cluster does not require Ray's token authentication, serve several users "
                          "anyway: each can then read the others' work")
    iso.add_argument("--worker-memory", default="auto", metavar="SIZE",
                     help="host memory limit of a worker per slot it holds, like 8G; auto (the "
                          "default): 90%% of the host's memory divided by the slots; none: no limit")
    iso.add_argument("--worker-pids", default=os.environ.get("RGPU_WORKER_PIDS", "auto"), metavar="N",
                     help="processes and threads (each counts) a worker may run per slot it holds, "
                          "as a cgroup's pids.max, else RLIMIT_NPROC; auto: 4096, or each slot's share "
                          "of 90%% of the host's process table where that is less; none: no limit "
                          "(default: $RGPU_WORKER_PIDS, else auto)")
    iso.add_argument("--session-root", metavar="DIR",
                     help="where each lease's session folder goes (default: sessions/ next to the store)")
    iso.add_argument("--session-disk", default="auto", metavar="SIZE",
                     help="disk each user's session folders (live and parked) may take in all, like "
                          "20G. A root server isolating with uids gives each user a filesystem of that "
                          "size (loop-mounted), where writes past it fail; otherwise the server measures "
                          "the folders and stops the cells of a user past it. auto (the default): a "
                          "tenth of the filesystem that holds the session root, at least 1G; none: no "
                          "limit")
    iso.add_argument("--worker-env", action="append", default=[], metavar="NAME",
                     help="also pass this server environment variable to workers (repeatable; "
                          "names ending in _ pass every variable with that prefix)")
    iso.add_argument("--no-worker-pip-settings", action="store_true",
                     help="do not pass the server's pip settings (its PIP_* variables and pip.conf "
                          "files: an index URL, certificates, trusted hosts) to workers; by default "
                          "they are passed, so that %%pip install in a cell reaches packages the way "
                          "this machine does")
    lim = p.add_argument_group("limits on what one client may send (see README: Limits on what one "
                               "client may send)")
    lim.add_argument("--max-push", default="16G", metavar="SIZE",
                     help="the largest push (its variables together), like 16G (default 16G); a "
                          "larger one is refused and the session goes on")
    lim.add_argument("--max-upload", default="1G", metavar="SIZE",
                     help="the largest upload (%%gpu upload, its files together), like 1G (default "
                          "1G); a larger one is refused before anything is written")
    lim.add_argument("--max-message", default="16M", metavar="SIZE",
                     help="the largest other message: a cell's code, a widget's message with its "
                          "binary data (default 16M)")
    lim.add_argument("--max-requests", type=int, default=64, metavar="N",
                     help="requests one connection may have waiting or running at once (default 64)")
    lim.add_argument("--connection-memory", default="128M", metavar="SIZE",
                     help="client data the server holds for one connection at once: requests "
                          "waiting their turn, and how far a push may run ahead of its worker "
                          "(default 128M)")
    lim.add_argument("--session-cache", default="auto", metavar="SIZE",
                     help="pushed data each session's worker keeps, named by content, so that a "
                          "push of an unchanged array sends only its name, like 2G. auto (the "
                          "default): 2G, or a quarter of --worker-memory where that is less; none: "
                          "keep nothing, every push sends every byte. Nothing is shared between "
                          "sessions; all of it is freed when the session ends")
    lim.add_argument("--no-bulk-stream", action="store_true",
                     help="do not offer clients a second connection for the bytes of pushes and "
                          "pulls (same port, same TLS, opened with a one-time ticket); they then "
                          "travel on the session's websocket, at about a third of the speed on a "
                          "fast link")
    lim.add_argument("--max-connections-per-user", type=int, default=32, metavar="N",
                     help="websockets one user may hold open at once (each notebook session is "
                          "one); one more is refused (default 32)")
    p.set_defaults(func=cmd_serve)


def _env_specs(given: list[str]) -> list[str]:
    """``--env`` flags, else ``$RGPU_ENVS`` (comma-separated)."""
    if given:
        return given
    return [spec for spec in os.environ.get("RGPU_ENVS", "").split(",") if spec.strip()]


def add_token(sub: Any) -> None:
    """Add ``rgpu token`` to ``rgpu``'s subparsers (an entry point)."""
    p = sub.add_parser("token", help="create, list and revoke tokens")
    tsub = p.add_subparsers(dest="token_cmd", required=True)
    c = tsub.add_parser("create", help="create a token for USER and print it once")
    c.add_argument("user")
    c.add_argument("--days", type=float, help="expire after N days (default: never)")
    c.add_argument("--admin", action="store_true", help="an admin token sees every user's jobs")
    c.add_argument("--max-gpus", type=int, metavar="N", help="this token's quota of slots held at once")
    c.add_argument("--max-waiting", type=int, metavar="N", help="this token's quota of waiting requests")
    c.add_argument("--db", help=DB_HELP)
    c = tsub.add_parser("list", help="list tokens (never the tokens themselves)")
    c.add_argument("--db", help=DB_HELP)
    c = tsub.add_parser("revoke", help="revoke token ID")
    c.add_argument("id", type=int)
    c.add_argument("--db", help=DB_HELP)
    p.set_defaults(func=cmd_token)


def add_up(sub: Any) -> None:
    """Add ``rgpu up`` to ``rgpu``'s subparsers (an entry point)."""
    add_up_command(sub, DB_HELP)
