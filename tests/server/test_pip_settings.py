"""The server's pip configuration as a worker's ``PIP_*`` variables (no server needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remote_gpu_server.isolation.modes import IsolationMode
from remote_gpu_server.isolation.pip_settings import config_files, pip_environment
from remote_gpu_server.isolation.policy import Isolation, IsolationConfig


def _home(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nindex-url = https://user.invalid/simple\ntrusted-host = user.invalid\n"
        "find-links =\n    /a\n    /b\n[download]\ndest = /ignored\n")
    return {"HOME": str(home), "XDG_CONFIG_DIRS": str(tmp_path / "none")}


def test_the_users_config_file_becomes_variables(tmp_path: Path) -> None:
    env = pip_environment(_home(tmp_path), prefix=str(tmp_path / "venv"))
    assert env["PIP_INDEX_URL"] == "https://user.invalid/simple"
    assert env["PIP_TRUSTED_HOST"] == "user.invalid"
    assert env["PIP_FIND_LINKS"] == "/a /b"  # a list, as pip reads a variable's value
    assert "PIP_DEST" not in env  # only [global] and [install]
    assert env["PIP_DISABLE_PIP_VERSION_CHECK"] == "1"
    assert env["PIP_NO_CACHE_DIR"] == "1"  # a cache would last one lease, on the user's disk


def test_the_servers_cache_setting_wins_over_no_cache(tmp_path: Path) -> None:
    environ = {**_home(tmp_path), "PIP_NO_CACHE_DIR": "0"}
    assert pip_environment(environ, str(tmp_path / "venv"))["PIP_NO_CACHE_DIR"] == "0"


def test_precedence_is_pips_own(tmp_path: Path) -> None:
    environ = _home(tmp_path)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pip.conf").write_text("[global]\ntrusted-host = site.invalid\n[install]\ntrusted-host = install.invalid\n")
    assert pip_environment(environ, str(venv))["PIP_TRUSTED_HOST"] == "install.invalid"
    named = tmp_path / "named.conf"
    named.write_text("[global]\nindex-url = https://named.invalid/simple\n")
    environ["PIP_CONFIG_FILE"] = str(named)
    env = pip_environment(environ, str(venv))
    # A PIP_CONFIG_FILE that exists replaces the user's files (as in pip) and wins over the site's.
    assert env["PIP_INDEX_URL"] == "https://named.invalid/simple" and "PIP_FIND_LINKS" not in env
    environ["PIP_INDEX_URL"] = "https://variable.invalid/simple"
    assert pip_environment(environ, str(venv))["PIP_INDEX_URL"] == "https://variable.invalid/simple"


def test_settings_that_install_elsewhere_or_name_the_servers_files_stay_behind(tmp_path: Path) -> None:
    environ = {**_home(tmp_path), "PIP_TARGET": "/t", "PIP_USER": "1", "PIP_CACHE_DIR": "/root/.cache",
               "PIP_CONFIG_FILE": str(tmp_path / "missing.conf"), "PIP_CERT": "/etc/ssl/mirror.pem"}
    (tmp_path / "home" / ".pip").mkdir()
    (tmp_path / "home" / ".pip" / "pip.conf").write_text("[global]\nprefix = /p\nroot = /r\nlog = /l\n")
    env = pip_environment(environ, str(tmp_path / "venv"))
    assert env["PIP_CERT"] == "/etc/ssl/mirror.pem"
    for name in ("PIP_TARGET", "PIP_USER", "PIP_CACHE_DIR", "PIP_CONFIG_FILE", "PIP_PREFIX", "PIP_ROOT", "PIP_LOG"):
        assert name not in env, name


def test_devnull_turns_the_files_off_and_a_broken_file_is_skipped(tmp_path: Path) -> None:
    environ = {**_home(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    assert config_files(environ) == []
    assert "PIP_INDEX_URL" not in pip_environment(environ)
    broken, empty = tmp_path / "broken.conf", tmp_path / "empty.conf"
    broken.write_bytes(b"[global\n\xff")
    empty.write_text("")
    base = {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    assert pip_environment({**base, "PIP_CONFIG_FILE": str(broken)}, str(tmp_path)) == pip_environment(
        {**base, "PIP_CONFIG_FILE": str(empty)}, str(tmp_path))


@pytest.mark.parametrize("passed", [True, False])
def test_a_workers_environment_has_them_unless_the_server_says_no(
        passed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("RGPU_TEST_UNRELATED_SECRET", "the server's own")
    config = IsolationConfig(mode=IsolationMode.UIDS, session_root=tmp_path, worker_pip_settings=passed)
    env = Isolation(config, tmp_path / "rgpu.sqlite3").environment({})
    assert ("PIP_INDEX_URL" in env) is passed  # rgpu serve --no-worker-pip-settings
    assert env["HTTPS_PROXY"] == "http://proxy.invalid:3128" and "RGPU_TEST_UNRELATED_SECRET" not in env
    assert env["PIP_DISABLE_PIP_VERSION_CHECK"] == "1" and env["PIP_NO_CACHE_DIR"] == "1"
