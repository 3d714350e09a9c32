"""``rgpu``: connect a notebook, install the kernel, follow jobs; and, where the
server side is installed, its commands too.

The server's commands (``serve``, ``token``, ``up``) live with the server
(:mod:`remote_gpu_server.cli`), which announces them through the entry
points of the group :data:`COMMANDS`; this module never imports it. Where
the server extra is not installed, those commands say how to get it:
``pip install 'remote-gpu-kernel[server]'``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import __version__
from .cli_jobs import add_job_commands, add_tls_arguments
from remote_gpu_core.login import save_client_config

__all__ = ["COMMANDS", "build_parser", "main"]

#: The entry point group through which other packages add ``rgpu`` commands:
#: each entry point is a function that takes ``rgpu``'s subparsers.
COMMANDS = "rgpu.commands"


def cmd_login(args: argparse.Namespace) -> int:
    from remote_gpu_core import tls
    from remote_gpu_core.errors import TlsError

    try:
        tls.refuse_plain_text(args.url, bool(args.insecure))
        tls.ssl_context(args.url, args.cafile)
    except TlsError as exc:
        print(f"rgpu login: {exc}", file=sys.stderr)
        return 1
    path = save_client_config(args.url, args.token, cafile=args.cafile, insecure=bool(args.insecure))
    print(f"saved the server URL and token to {path}")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    """``rgpu kernel install``: write the "Remote GPU" kernelspec, as ipykernel's installer does."""
    import errno

    from .kernelspec import DISPLAY_NAME, KERNEL_NAME, install

    name, display_name = args.name, args.display_name
    if args.env and args.env != "default":  # one kernelspec per environment, side by side
        name = name if name != KERNEL_NAME else f"{KERNEL_NAME}-{args.env}"
        display_name = display_name or f"{DISPLAY_NAME} ({args.env})"
    try:
        dest = install(user=args.user, prefix=args.prefix, kernel_name=name,
                       display_name=display_name, url=args.url, gpus=args.gpus,
                       priority=args.priority, pool=args.pool, cafile=args.cafile,
                       insecure=bool(args.insecure), env=args.env)
    except OSError as exc:
        if exc.errno != errno.EACCES:
            raise
        print(f"rgpu kernel install: {exc}", file=sys.stderr)
        if not args.user:
            print("Perhaps you want --user or --sys-prefix?", file=sys.stderr)
        return 1
    print(f"Installed kernelspec {name} in {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgpu", description="Remote GPU for Jupyter.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("login", help="save a server URL and token for this user's notebooks")
    p.add_argument("url")
    p.add_argument("token")
    add_tls_arguments(p)
    p.set_defaults(func=cmd_login)

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
    c.add_argument("--env", metavar="NAME",
                   help='the Python environment its worker runs (rgpu envs lists them); installs '
                        '"Remote GPU (NAME)" as remote-gpu-NAME unless --name or --display-name say otherwise')
    c.add_argument("--cafile", metavar="PATH",
                   help="written into the spec as RGPU_CA: trust this CA certificate, or a "
                        "self-signed server's own certificate")
    c.add_argument("--insecure", action="store_true",
                   help="written into the spec as RGPU_INSECURE=1: allow plain ws:// to a host "
                        "other than this machine")
    p.set_defaults(func=cmd_kernel)
    add_job_commands(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """The commands other packages add (see :data:`COMMANDS`); one whose
    package cannot be imported says how to install it when run."""
    from importlib.metadata import entry_points

    for point in sorted(entry_points(group=COMMANDS), key=lambda p: p.name):
        try:
            add = point.load()
        except ImportError as exc:
            p = sub.add_parser(point.name, help="(needs the server side: pip install "
                                                "'remote-gpu-kernel[server]')", add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(func=_missing(point.name, exc))
            continue
        add(sub)


def _missing(name: str, exc: ImportError) -> Any:
    def say(args: argparse.Namespace) -> int:
        print(f"rgpu {name}: the server side is not installed ({exc}): "
              "pip install 'remote-gpu-kernel[server]'", file=sys.stderr)
        return 1

    return say


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
