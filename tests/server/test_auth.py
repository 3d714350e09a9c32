"""Tokens: only hashes stored, and the handshake refuses bad ones with 401."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from remote_gpu_kernel import AuthenticationError, Client
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
    token = server.token("carol")
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
