"""Helpers for the sidebar's tests: where its npm package is, and node."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["EXT_DIR", "ROOT", "need_binary", "npm_installed"]

ROOT = Path(__file__).resolve().parents[2]
EXT_DIR = ROOT / "jupyterlab_ext"


def need_binary(name: str, install: str) -> str:
    """The path of ``name``, or skip the test saying how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed here; install it with: {install}")
    return path


def npm_installed() -> str:
    """``npm``, after ``npm ci`` if ``jupyterlab_ext/node_modules`` is missing."""
    need_binary("node", "apt-get install -y nodejs npm (Node.js >= 20)")
    npm = need_binary("npm", "apt-get install -y nodejs npm (Node.js >= 20)")
    if not (EXT_DIR / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXT_DIR, check=True,
                       capture_output=True, text=True, timeout=600)
    return npm
