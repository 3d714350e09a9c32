"""``rgpu env check PYTHON``: can workers run in this interpreter?

The command joins an ``env`` command that another package (the client's
``rgpu env diff``) added already; it reaches ``rgpu`` through the
``rgpu.commands`` entry points, like the server's other commands.
"""

from __future__ import annotations

import argparse
from typing import Any

from .check import check_interpreter

__all__ = ["add_env", "cmd_env_check"]


def cmd_env_check(args: argparse.Namespace) -> int:
    """``rgpu env check PYTHON``: can workers run in this interpreter? Exit 1 if not."""
    check = check_interpreter(args.python)
    print(check.report())
    return 0 if check.ok else 1


def add_env(sub: Any) -> None:
    """Add ``rgpu env check`` to ``rgpu``'s subparsers (an entry point); joins an
    ``env`` command that another package added already."""
    existing = sub.choices.get("env")
    if existing is None:
        p = sub.add_parser("env", help="Python environments of workers")
        esub = p.add_subparsers(dest="env_cmd", required=True)
    else:
        esub = next(a for a in existing._actions if isinstance(a, argparse._SubParsersAction))
    c = esub.add_parser("check", help="check that workers can run in the interpreter PYTHON",
                        description="Run PYTHON and check what a worker needs of it: a supported Python "
                                    "and the worker's packages. Each problem comes with the pip line that "
                                    "fixes it. Exit status 0 where workers can run, else 1.")
    c.add_argument("python", metavar="PYTHON", help="the interpreter's absolute path, e.g. /opt/envs/np1/bin/python")
    c.set_defaults(func=cmd_env_check)
