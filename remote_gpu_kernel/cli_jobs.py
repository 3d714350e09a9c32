"""The ``rgpu`` commands that talk to a server's HTTP API.

``submit``, ``jobs``, ``job``, ``logs``, ``cancel``, ``status``, ``top`` and
``usage``. Each finds its server as the notebook client does (``--url`` /
``--token``, then ``RGPU_URL`` / ``RGPU_TOKEN``, then ``rgpu login``'s
file), calls :class:`~.api.ApiClient`, and prints with ``rich``. An error
the server or the network gives is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

from .api import ApiClient, ApiError
from remote_gpu_core.errors import AuthenticationError, TlsError
from remote_gpu_core.sizes import format_size

__all__ = ["add_job_commands", "add_tls_arguments"]

JOB_STATES = ("queued", "running", "completed", "failed", "cancelled", "timed_out")
PRIORITIES = ("high", "normal", "low")
_STATE_STYLE = {"queued": "yellow", "running": "cyan", "completed": "green", "failed": "red",
                "cancelled": "magenta", "timed_out": "red"}


def _console() -> Any:
    from rich.console import Console

    return Console()


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_config(args.url, args.token, cafile=args.cafile, insecure=args.insecure)


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bytes(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _cost(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]"


#: The longest first line of a cell shown in ``rgpu jobs``.
_LINE_SHOWN = 40


def _job_name(job: dict[str, Any]) -> str:
    """A batch job's name; for a cell, its notebook's file name and its first line, as the sidebar shows them."""
    if job.get("name"):
        return str(job["name"])
    notebook = PureWindowsPath(job["notebook"]).name if job.get("notebook") else ""  # / and \ both split
    line = str(job.get("first_line") or "")
    if len(line) > _LINE_SHOWN:
        line = line[: _LINE_SHOWN - 1] + "…"
    return ": ".join(part for part in (notebook, line) if part)


# -- commands --------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.script)
    try:
        code = path.read_text()
    except OSError as exc:
        print(f"rgpu submit: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 1
    job = _client(args).submit(code, name=args.name or path.name, gpus=args.gpus,
                               priority=args.priority, pool=args.pool, timeout=args.timeout,
                               retries=args.retries, env=args.env)
    print(job["id"])
    print(f"job {job['id']} queued: rgpu logs {job['id']} --follow", file=sys.stderr)
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from rich.table import Table

    jobs = _client(args).jobs(user=args.user, state=args.state, kind=args.kind, limit=args.limit)
    table = Table("id", "kind", "name", "user", "state", "gpus", "try", "created", "ran", "GPU-s", "cost")
    for j in jobs:
        end = j["ended"] or (time.time() if j["started"] else None)
        ran = end - j["started"] if j["started"] and end else None
        table.add_row(str(j["id"]), j["kind"], _job_name(j), j["user"], _state(j["state"]),
                      str(j["gpus"]), str(j["attempt"] or ""), _when(j["created"]), _duration(ran),
                      f"{j['gpu_seconds']:.0f}", _cost(j["cost"]))
    _console().print(table)
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from rich.table import Table

    j = _client(args).job(args.id)
    table = Table(show_header=False, box=None)
    for key in ("id", "kind", "name", "notebook", "first_line", "user", "state", "error", "gpus", "priority",
                "pool", "timeout", "retries", "slots"):
        value = j.get(key)
        if value is not None and value != []:
            shown = ",".join(value) if isinstance(value, list) else str(value)
            table.add_row(key, _state(shown) if key == "state" else shown)
    for key in ("created", "started", "ended"):
        table.add_row(key, _when(j[key]))
    table.add_row("GPU-seconds", f"{j['gpu_seconds']:.1f}")
    if j.get("cost") is not None:
        table.add_row("cost", _cost(j["cost"]))
    console = _console()
    console.print(table)
    if j["attempts"]:
        attempts = Table("attempt", "state", "slots", "started", "ended", "error")
        for a in j["attempts"]:
            attempts.add_row(str(a["attempt"]), _state(a["state"]), ",".join(a["slots"]),
                             _when(a["started"]), _when(a["ended"]), a["error"] or "")
        console.print(attempts)
    return 0


class _Printer:
    """Writes outputs to stdout, and a line on stderr where a retry's output begins."""

    def __init__(self) -> None:
        self.attempt: int | None = None

    def __call__(self, output: dict[str, Any]) -> None:
        attempt = output.get("attempt")
        if attempt is not None and self.attempt is not None and attempt != self.attempt:
            sys.stdout.flush()
            print(f"--- attempt {attempt} ---", file=sys.stderr, flush=True)
        self.attempt = attempt if attempt is not None else self.attempt
        sys.stdout.write(output["text"])


def cmd_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    show = _Printer()
    if not args.follow:
        for output in client.outputs(args.id):
            show(output)
        return 0
    for output in client.follow(args.id, poll=args.poll):
        show(output)
        sys.stdout.flush()
    job = client.job(args.id)
    if job["state"] != "completed":
        print(f"job {args.id} ended {job['state']}: {job['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.id)
    print(f"job {job['id']} {job['state']}")
    return 0


def _status_tables(status: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    now = time.time()
    slots = Table("slot", "node", "name", "pool", "health", "use", "memory", "temp", "power", "held by", "for",
                  title=f"{status['you']['user']} on remote-gpu-server {status['server']['version']}")
    for s in status["slots"]:
        r = s["readings"]
        holder = s["holder"]
        held = "" if holder is None else holder["user"] + (" (you)" if holder["mine"] else "")
        if holder is not None and holder.get("kind") == "batch":
            held += f" job {holder['job']}" if holder.get("job") else " batch"
        memory = f"{_bytes(r['memory_used'])} / {_bytes(r['memory_total'])}"
        slots.add_row(
            s["id"], s.get("node") or "", s["name"], s["pool"], _health(s),
            "-" if r["utilization"] is None else f"{r['utilization']:.0f}%", memory,
            "-" if r["temperature"] is None else f"{r['temperature']:.0f}°C",
            "-" if r["power"] is None else f"{r['power']:.0f} W",
            held, _duration(now - holder["since"]) if holder else "",
        )
    queue = Table("#", "user", "gpus", "priority", "pool", "waited", "job", title="queue")
    for q in status["queue"]:
        queue.add_row(str(q["position"] or "-"), q["user"] + (" (you)" if q["mine"] else ""),
                      str(q["gpus"]), q["priority"], q["pool"], _duration(q["waited"]),
                      str(q["job"] or ""))
    parts: list[Any] = [slots]
    parts.append(queue if status["queue"] else "[dim]nobody is waiting[/]")
    parked = status.get("parked") or []  # servers before parking have none
    if parked:
        table = Table("user", "gpus", "pool", "parked", "on disk", "session", "notebook", title="parked (no GPU held)")
        for p in parked:
            table.add_row(p["user"] + (" (you)" if p["mine"] else ""), str(p["gpus"]), p["pool"],
                          _duration(now - p["since"]), _bytes(p["nbytes"]), (p["id"] or "")[:8],
                          p.get("notebook") or "")
        parts.append(table)
    return Group(*parts)


def _health(slot: dict[str, Any]) -> str:
    """ok, draining (with the pids that hold it, shown to an admin), or unhealthy and why."""
    draining = slot.get("draining")
    if draining:
        processes = draining.get("processes") or []
        if any(p.get("pid") is None for p in processes):  # not an admin: no pids
            return f"[yellow]draining[/]: held by {len(processes)} process(es) of a stopped worker"
        held = ", ".join(f"{p['pid']} ({_bytes(p.get('memory'))})" for p in processes)
        return f"[yellow]draining[/]: held by pid {held}"
    return "[green]ok[/]" if slot["healthy"] else f"[red]unhealthy[/] {slot.get('problem') or ''}"


def cmd_status(args: argparse.Namespace) -> int:
    _console().print(_status_tables(_client(args).status()))
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    """``rgpu envs``: the server's Python environments, their Python and key packages."""
    from rich.table import Table

    envs = _client(args).status().get("envs")
    if envs is None:  # a server before named environments
        print("this server has one environment, its own Python (default)")
        return 0
    table = Table("env", "python", "version", "packages", "warm", title="environments (%%gpu --env NAME)")
    for env in envs:
        packages = ", ".join(f"{name} {version}" for name, version in env["packages"].items())
        table.add_row(env["name"], env["python"], env["version"], packages, str(env.get("warm", "")))
    _console().print(table)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live

    client = _client(args)
    with _keys() as keys:
        hint = [f"[dim]every {args.interval:g} s; q quits[/]"] if keys is not None else []

        def view() -> Any:
            return Group(_status_tables(client.status()), *hint)

        try:
            with Live(view(), console=_console(), auto_refresh=False, screen=False) as live:
                shown = 1
                while args.count is None or shown < args.count:
                    if _quit_pressed(keys, args.interval):
                        break
                    live.update(view(), refresh=True)
                    shown += 1
        except KeyboardInterrupt:
            return 0
    return 0


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """The terminal's descriptor, read key by key without echo while inside; None if stdin is no terminal."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # replaced (pytest) or closed
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(keys: int | None, timeout: float) -> bool:
    """Wait ``timeout`` seconds; True as soon as ``q`` is pressed on the terminal ``keys``."""
    if keys is None:
        time.sleep(timeout)
        return False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([keys], [], [], left)[0]:
            key = os.read(keys, 1)
            if key in (b"q", b"Q") or not key:  # not key: the terminal went away
                return True
    return False


def cmd_usage(args: argparse.Namespace) -> int:
    from rich.table import Table

    since = time.time() - args.days * 86400 if args.days else None
    usage = _client(args).usage(since)
    priced = usage["price_per_gpu_hour"] is not None
    title = "GPU time" + (f" in the last {args.days:g} day(s)" if args.days else "")
    if priced:
        title += f" at {usage['price_per_gpu_hour']:g} per GPU-hour"
    table = Table("user", "GPU-hours", *(["cost"] if priced else []), title=title)
    for u in usage["users"]:
        name = u["user"] + (" (you)" if u["mine"] else "")
        table.add_row(name, f"{u['gpu_seconds'] / 3600:.3f}", *([_cost(u["cost"])] if priced else []))
    total = usage["total"]
    table.add_row("[bold]total[/]", f"{total['gpu_seconds'] / 3600:.3f}",
                  *([_cost(total["cost"])] if priced else []))
    _console().print(table)
    return 0


# -- the parser --------------------------------------------------------------


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ApiError, AuthenticationError, TlsError, ValueError) as exc:
            print(f"rgpu {args.cmd}: {exc}", file=sys.stderr)
            return 1

    return run


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cafile`` and ``--insecure``, as every client command takes them."""
    parser.add_argument("--cafile", metavar="PATH",
                        help="trust this CA certificate, or a self-signed server's own certificate, "
                             "besides the system's CAs (default: $RGPU_CA, else rgpu login's)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow sending the token over plain ws:// / http:// to a host other "
                             "than this machine (default: $RGPU_INSECURE)")


def add_job_commands(sub: Any) -> None:
    """Add the HTTP API commands to ``rgpu``'s subparsers."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help="the server (default: $RGPU_URL, else rgpu login's)")
    server.add_argument("--token", help="the token (default: $RGPU_TOKEN, else rgpu login's)")
    add_tls_arguments(server)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                           parents=[server])
        p.set_defaults(func=_guarded(func))
        return p

    from .cli_env import add_env_commands

    add_env_commands(sub, server, _guarded)

    p = command("submit", cmd_submit, "submit a Python script as a batch job and print its id")
    p.add_argument("script", help="the script to run (its text is sent; it runs on the server)")
    p.add_argument("--gpus", type=int, default=1, help="slots to lease for it (default 1)")
    p.add_argument("--priority", choices=PRIORITIES, default="normal")
    p.add_argument("--pool", help="the slot pool to run in (default: the default pool)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop it after this long")
    p.add_argument("--retries", type=int, default=0,
                   help="run it again up to N times if its worker dies (default 0)")
    p.add_argument("--name", help="a name for the job (default: the script's file name)")
    p.add_argument("--env", metavar="NAME",
                   help="the Python environment it runs in (default: $RGPU_ENV, else the server's own; "
                        "rgpu envs lists them)", default=os.environ.get("RGPU_ENV"))

    p = command("jobs", cmd_jobs, "list your jobs (an admin token: everyone's)")
    p.add_argument("--user", help="only this user's jobs (admin tokens)")
    p.add_argument("--state", choices=JOB_STATES)
    p.add_argument("--kind", choices=("batch", "cell"))
    p.add_argument("--limit", type=int, default=50, help="show at most N (default 50)")

    p = command("job", cmd_job, "show one job, its attempts and GPU time")
    p.add_argument("id", type=int)

    p = command("logs", cmd_logs, "print a job's output")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)

    p = command("cancel", cmd_cancel, "cancel a queued or running job (a running one is interrupted; if it "
                "ignores that, its worker is stopped: SIGTERM, then SIGKILL)")
    p.add_argument("id", type=int)

    command("status", cmd_status, "show the GPUs and the queue")
    command("envs", cmd_envs, "list the server's Python environments with their Python and key packages")

    p = command("top", cmd_top, "show the GPUs and the queue, refreshed in place until q or Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("-n", "--count", type=int, help="stop after N refreshes")

    p = command("usage", cmd_usage, "show GPU time (and cost) per user")
    p.add_argument("--days", type=float, help="only the last N days")
