"""``rgpu env``: the environments of the GPU server, seen from this Python.

``rgpu env diff [NAME]`` compares this Python's versions of what crosses
between a notebook and its worker (Python's minor version, cloudpickle,
numpy, torch, pandas; see :mod:`remote_gpu_core.fingerprint`) with those of
the server's environment ``NAME`` (default: ``default``, the server's own
Python), as the server's HTTP API tells them (``GET /api/fingerprint``,
with the user's token). It prints every row, marks the differences, and
exits 1 where there is one, as ``diff`` does; where the server's
``/api/status`` lists its environments with their versions, it names one
that matches.
"""

from __future__ import annotations

import argparse
from typing import Any

from .api import ApiClient
from .versions import client_fingerprint, comparison, matching_environment, table

__all__ = ["add_env_commands", "cmd_env_diff"]


def cmd_env_diff(args: argparse.Namespace) -> int:
    client = ApiClient.from_config(args.url, args.token, cafile=args.cafile, insecure=args.insecure)
    answer = client.fingerprint(args.name)
    rows, differ = comparison(answer["fingerprint"])
    print(table(rows, str(answer["env"])))
    if differ:
        # The server's environments, where its status lists them with their versions.
        match = matching_environment(client_fingerprint(), client.status(), str(answer["env"]))
        choose = f"environment `{match}` matches" if match else "or choose an environment that matches"
        print(f"\n{differ} of {len(rows)} differ: values that reference them may not cross between "
              f"this notebook and the GPU server; install the server's versions here, {choose}")
    else:
        print("\nall the same")
    return 1 if differ else 0


def add_env_commands(sub: Any, server: argparse.ArgumentParser, guarded: Any) -> Any:
    """Add ``rgpu env`` to ``rgpu``'s subparsers (``server``: the parent parser
    of the URL, token and TLS arguments; ``guarded``: what turns a command's
    API errors into one line). Returns ``env``'s own subparsers, for more
    ``rgpu env`` commands."""
    p = sub.add_parser("env", help="the GPU server's Python environments, seen from this Python",
                       description="The GPU server's Python environments, seen from this Python.")
    env = p.add_subparsers(dest="env_cmd", required=True)
    d = env.add_parser(
        "diff", parents=[server],
        help="compare this Python's versions of what crosses (Python, cloudpickle, numpy, torch, "
             "pandas) with the server's; exit 1 where one differs",
        description="Compare this Python's versions of Python, cloudpickle, numpy, torch and pandas with "
                    "those of an environment of the GPU server; '!' marks a difference, and the "
                    "command exits 1 where there is one.")
    d.add_argument("name", nargs="?", default="default",
                   help="the server's environment (default: default, the server's own Python)")
    d.set_defaults(func=guarded(cmd_env_diff))
    return env
