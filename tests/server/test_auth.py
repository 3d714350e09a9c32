"""Tokens: only hashes stored, the handshake refuses bad ones with 401, and their
last use is written once a period, not on every request."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from remote_gpu_kernel import AuthenticationError, Client
from remote_gpu_kernel.api import ApiClient
from remote_gpu_server.errors import StoreError, TokenError
from postgres import BACKENDS
from servers import ServerProcess
from stores import BlockingStore, execute_raw, is_postgres


def test_only_a_hash_of_the_token_is_stored(store_location: str) -> None:
    store = BlockingStore(store_location)
    token_id, token = store.create_token("alice")
    assert store.verify_token(token).user == "alice"
    assert store.verify_token(token).id == token_id
    rows = repr(execute_raw(store_location, "SELECT * FROM tokens"))
    assert token not in rows and token[len("rgpu_"):] not in rows
    if not is_postgres(store_location):  # nor anywhere in the files
        raw = Path(store_location).read_bytes() + Path(store_location + "-wal").read_bytes()
        assert token.encode() not in raw
    store.close()


def test_missing_wrong_expired_and_revoked_tokens_say_why(store_location: str) -> None:
    store = BlockingStore(store_location)
    _, good = store.create_token("bob")
    expired_id, expired = store.create_token("bob", days=1)
    execute_raw(store_location, "UPDATE tokens SET expires = ? WHERE id = ?", (time.time() - 1, expired_id))
    revoked_id, revoked = store.create_token("bob")
    store.revoke_token(revoked_id)
    for token, reason in [(None, "missing token"), ("rgpu_nope", "invalid token"),
                          (expired, "expired token"), (revoked, "revoked token")]:
        with pytest.raises(TokenError, match=reason):
            store.verify_token(token)
    assert store.verify_token(good).user == "bob"
    with pytest.raises(StoreError, match="already revoked"):
        store.revoke_token(revoked_id)
    with pytest.raises(StoreError, match="no token"):
        store.revoke_token(999)
    with pytest.raises(StoreError, match="user name"):
        store.create_token("bad name!")
    store.close()


def test_handshake_refuses_bad_tokens_with_401_and_a_reason(server: ServerProcess, alice: str) -> None:
    for headers, reason in [({}, "missing token"),
                            ({"Authorization": "Bearer rgpu_wrong"}, "invalid token"),
                            ({"Authorization": "Basic abc"}, "missing token")]:
        with pytest.raises(InvalidStatus) as info:
            connect(server.url, additional_headers=headers)
        assert info.value.response.status_code == 401
        assert reason in info.value.response.body.decode()
    with pytest.raises(AuthenticationError, match="invalid token"):
        Client(server.url, "rgpu_wrong").session()
    # the token never shows in the server's log
    assert not any(alice in line or "rgpu_wrong" in line for line in server.log)


@pytest.mark.parametrize("fresh_server", BACKENDS, indirect=True)
def test_revoked_token_is_refused_by_the_running_server(fresh_server: ServerProcess) -> None:
    """``rgpu token create/list/revoke --db`` on the store of a running server."""
    server = fresh_server
    token = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "token", "create", "carol",
                            "--db", str(server.db)], capture_output=True, text=True, check=True).stdout.strip()
    server.start()
    with Client(server.url, token).session() as session:
        assert session.execute("1").ok
    listing = subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "token", "list",
                              "--db", str(server.db)], capture_output=True, text=True, check=True)
    assert "carol" in listing.stdout and token not in listing.stdout
    store = BlockingStore(server.db)
    token_id = max(t.id for t in store.list_tokens() if t.user == "carol")
    store.close()
    subprocess.run([sys.executable, "-m", "remote_gpu_kernel.cli", "token", "revoke", str(token_id),
                    "--db", str(server.db)], check=True, capture_output=True)
    with pytest.raises(AuthenticationError, match="revoked"):
        Client(server.url, token).session()


def _last_used(location: str | Path, token_id: int) -> float | None:
    (row,) = execute_raw(location, "SELECT last_used FROM tokens WHERE id = ?", (token_id,))
    return row[0]  # type: ignore[no-any-return]


def test_a_tokens_last_use_is_written_once_a_period_and_at_close(store_location: str) -> None:
    store = BlockingStore(store_location)
    token_id, token = store.create_token("alice")
    writes: list[str] = []
    db = store.store.db
    for name in ("execute", "executemany"):
        real = getattr(db, name)

        async def counted(sql: str, *args: object, _real: object = real) -> object:
            writes.append(sql)
            return await _real(sql, *args)  # type: ignore[operator]

        setattr(db, name, counted)
    first = time.time()
    store.verify_token(token)  # the first use is written at once
    assert len(writes) == 1 and _last_used(store_location, token_id) >= first  # type: ignore[operator]
    written = _last_used(store_location, token_id)
    for _ in range(200):
        store.verify_token(token)
    latest = time.time()
    store.verify_token(token)
    store.write_last_used()  # nothing is due within the period
    assert len(writes) == 1 and _last_used(store_location, token_id) == written
    store.store.last_used_period = 0.0  # the period has passed: the latest use is written
    store.write_last_used()
    assert len(writes) == 2 and _last_used(store_location, token_id) >= latest  # type: ignore[operator]
    store.store.last_used_period = 3600.0
    store.verify_token(token)
    latest = time.time()
    store.verify_token(token)
    assert len(writes) == 2
    store.close()  # what waits is written, not lost
    assert len(writes) == 3 and _last_used(store_location, token_id) >= latest  # type: ignore[operator]


def test_http_requests_do_not_write_the_store_and_a_clean_stop_keeps_the_last_use(
        fresh_server: ServerProcess) -> None:
    token = fresh_server.token("dora")
    fresh_server.start(wait_warm=False)
    store = BlockingStore(fresh_server.db)
    (token_id,) = [t.id for t in store.list_tokens() if t.user == "dora"]
    store.close()
    api = ApiClient(fresh_server.url, token)
    api.jobs()
    first = _last_used(fresh_server.db, token_id)
    assert first is not None
    watcher = sqlite3.connect(fresh_server.db)
    try:
        # data_version changes when another connection commits anything to the file.
        before = watcher.execute("PRAGMA data_version").fetchone()
        for _ in range(50):
            api.status()
        started = time.time()
        api.jobs()
        ended = time.time()
        assert watcher.execute("PRAGMA data_version").fetchone() == before
        assert _last_used(fresh_server.db, token_id) == first
    finally:
        watcher.close()
    fresh_server.stop()
    assert started <= _last_used(fresh_server.db, token_id) <= ended  # type: ignore[operator]
