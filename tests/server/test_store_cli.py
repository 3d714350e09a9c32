"""The ``rgpu`` commands that open the store (``--db``) on a store they cannot use:
one line that says why, exit status 1, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import postgres as pg
from remote_gpu_kernel.cli import main
from remote_gpu_server.store import SCHEMA_VERSION
from stores import BlockingStore, execute_raw


def rgpu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", *argv],
                          capture_output=True, text=True, timeout=120)


def test_a_database_that_does_not_exist_is_named_by_every_command(postgres: pg.PostgresCluster,
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = postgres.url("no_such_database")
    for argv in (["token", "create", "alice", "--db", url], ["token", "list", "--db", url],
                 ["token", "revoke", "1", "--db", url]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"rgpu token: the database postgresql://postgres@{postgres.root}/no_such_database "
                              "is unavailable:") and '"no_such_database" does not exist' in err
        assert err.count("\n") == 1
    monkeypatch.setenv("RGPU_CONFIG", str(tmp_path / "client.json"))
    assert main(["up", "--db", url, "--port", "9"]) == 1
    assert "rgpu up: the database" in capsys.readouterr().err and not (tmp_path / "client.json").exists()
    served = rgpu("serve", "--port", "0", "--slots", "cpu:1", "--db", url)
    assert served.returncode == 1 and served.stderr.splitlines()[-1].startswith("rgpu serve: the database")


def test_a_newer_store_is_refused_by_the_commands(store_location: str, capsys: pytest.CaptureFixture[str]) -> None:
    BlockingStore(store_location).close()
    execute_raw(store_location, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    assert main(["token", "list", "--db", store_location]) == 1
    assert "upgrade remote-gpu-kernel" in capsys.readouterr().err
    served = rgpu("serve", "--port", "0", "--slots", "cpu:1", "--db", store_location)
    assert served.returncode == 1 and "upgrade remote-gpu-kernel" in served.stderr.splitlines()[-1]


def test_rgpu_db_may_hold_a_postgresql_url(postgres: pg.PostgresCluster, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with postgres.database() as url:
        monkeypatch.setenv("RGPU_DB", url)
        assert main(["token", "create", "dora"]) == 0
        assert capsys.readouterr().out.startswith("rgpu_")
        with BlockingStore(url) as store:
            assert [t.user for t in store.list_tokens()] == ["dora"]
