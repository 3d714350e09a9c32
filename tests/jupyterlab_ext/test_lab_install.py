"""The installed sidebar: both halves listed and enabled the standard way."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import remote_gpu_lab
from labext import EXT_DIR

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _jupyter(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "jupyter", *args], capture_output=True, text=True,
                         check=True, timeout=120)
    return _ANSI.sub("", out.stdout + out.stderr)


def test_labextension_is_listed_enabled() -> None:
    text = _jupyter("labextension", "list")
    assert re.search(r"remote-gpu-lab v0\.1\.0 enabled\s+OK", text), text


def test_server_extension_is_listed_enabled() -> None:
    text = _jupyter("server", "extension", "list")
    assert re.search(r"remote_gpu_lab enabled", text), text
    assert re.search(rf"remote_gpu_lab {re.escape(remote_gpu_lab.__version__)}\s+OK", text), text


def test_extension_points_name_the_built_package() -> None:
    [points] = remote_gpu_lab._jupyter_server_extension_points()
    assert points == {"module": "remote_gpu_lab"}
    [paths] = remote_gpu_lab._jupyter_labextension_paths()
    package = json.loads((EXT_DIR / "package.json").read_text())
    assert paths["dest"] == package["name"] == remote_gpu_lab.LABEXTENSION
    assert package["jupyterlab"]["outputDir"] == f"remote_gpu_lab/{paths['src']}"


def test_server_config_enables_the_extension() -> None:
    config = json.loads((EXT_DIR / "jupyter-config" / "server-config" / "remote_gpu_lab.json").read_text())
    assert config == {"ServerApp": {"jpserver_extensions": {"remote_gpu_lab": True}}}


def test_rspack_is_pinned_in_the_lock_file() -> None:
    lock = json.loads((EXT_DIR / "package-lock.json").read_text())
    for name in ("@rspack/core", "@rspack/binding"):
        assert lock["packages"][f"node_modules/{name}"]["version"] == "2.2.9", name
