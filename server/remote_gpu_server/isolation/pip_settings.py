"""The server's pip configuration, handed to workers as ``PIP_*`` variables.

GPU machines usually reach packages through a company mirror, set up for
the server's user: ``PIP_*`` variables (``PIP_INDEX_URL``, ``PIP_CERT``,
``PIP_TRUSTED_HOST``, ...) and pip's configuration files. A worker's pip
reads neither by itself: its environment is an allow-list, and its user's
``HOME`` is not the server's. :func:`pip_environment` reads the files pip
would read for the server's user, in pip's order (the machine's
``/etc/xdg/pip/pip.conf`` and ``/etc/pip.conf``, the user's
``~/.pip/pip.conf`` and ``~/.config/pip/pip.conf`` unless
``PIP_CONFIG_FILE`` names a file, the environment's ``pip.conf``, then
``PIP_CONFIG_FILE``), takes their ``[global]`` then ``[install]`` settings,
and lets the server's ``PIP_*`` variables win, as pip does. Settings that
would send packages elsewhere than the user's own site, or make pip write
where a worker cannot (``target``, ``prefix``, ``user``, ``root``,
``cache-dir``, ``log``, ``src``, ``config-file``), are left out.

pip's version check is turned off (``PIP_DISABLE_PIP_VERSION_CHECK=1``): a
worker's ``HOME`` is new for every lease, so pip would print its notice on
every install. For the same reason pip keeps no cache unless the server's
settings say otherwise (``PIP_NO_CACHE_DIR=1``): a cache in the session
folder would last one lease and take the user's disk twice over (a torch
wheel beside torch itself).

What the configuration holds (a mirror's password in an index URL) is
readable by every user's code: it is what their pip needs.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["PIP_NEVER", "config_files", "pip_environment"]

#: Settings never passed (their ``PIP_`` variable names).
PIP_NEVER = frozenset({"PIP_TARGET", "PIP_PREFIX", "PIP_USER", "PIP_ROOT", "PIP_CACHE_DIR", "PIP_LOG",
                       "PIP_LOG_FILE", "PIP_SRC", "PIP_CONFIG_FILE"})
_SECTIONS = ("global", "install")


def config_files(environ: Mapping[str, str], prefix: str = sys.prefix) -> list[Path]:
    """The pip configuration files of the server's user, least binding first."""
    dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in dirs.split(os.pathsep) if d] + [Path("/etc/pip.conf")]
    named = environ.get("PIP_CONFIG_FILE")
    if named == os.devnull:
        return []
    if not (named and os.path.exists(named)):
        home = Path(environ.get("HOME") or os.path.expanduser("~"))
        config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        files += [home / ".pip" / "pip.conf", config_home / "pip" / "pip.conf"]
    files.append(Path(prefix) / "pip.conf")
    if named:
        files.append(Path(named))
    return files


def _variable(key: str) -> str:
    return "PIP_" + key.strip().upper().replace("-", "_")


def _read(path: Path) -> dict[str, str]:
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (OSError, configparser.Error, UnicodeDecodeError):
        return {}
    found: dict[str, str] = {}
    for section in _SECTIONS:
        if parser.has_section(section):
            for key, value in parser.items(section):
                # pip splits a list's lines on whitespace, as it does a variable's value.
                found[_variable(key)] = " ".join(value.split())
    return found


def pip_environment(environ: Mapping[str, str] = os.environ, prefix: str = sys.prefix, *,
                    server_settings: bool = True) -> dict[str, str]:
    """The ``PIP_*`` variables of a worker's environment (see the module docstring);
    without ``server_settings`` (``rgpu serve --no-worker-pip-settings``), only the
    version check and the cache turned off."""
    env: dict[str, str] = {}
    if server_settings:
        for path in config_files(environ, prefix):
            env.update(_read(path))
        env.update((k, v) for k, v in environ.items() if k.startswith("PIP_"))
        env = {k: v for k, v in env.items() if k not in PIP_NEVER}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.setdefault("PIP_NO_CACHE_DIR", "1")
    return env
