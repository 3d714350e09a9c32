"""Tokens in the store: made, listed, revoked, and verified on every request.

Only a SHA-256 hash of each token is stored: tokens are 256 random bits,
so a plain hash is enough, and the lookup is by hash followed by a
constant-time comparison. Verifying a token (every HTTP request and
connection) reads it every time, so a revoked token is refused at once,
but writes its last use only once per :data:`LAST_USED_PERIOD`: the uses
in between are kept here and written by :meth:`TokenStore.write_last_used`
(called periodically by the server, and when the store closes).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError, TokenError
from .database import Database, DatabaseUnavailable
from .records import TokenInfo
from .users import UserIds

__all__ = ["LAST_USED_PERIOD", "TOKEN_PREFIX", "TokenStore", "hash_token"]

log = logging.getLogger("remote_gpu_server")

TOKEN_PREFIX = "rgpu_"
#: Seconds between two writes of one token's last use (see the module docstring).
LAST_USED_PERIOD = 60.0

_TOKEN_SELECT = (
    "SELECT t.id, u.name, t.admin, t.created, t.expires, t.revoked, t.last_used, "
    "t.max_gpus, t.max_waiting, t.hash FROM tokens t JOIN users u ON u.id = t.user_id"
)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token(row: Sequence[Any]) -> TokenInfo:
    return TokenInfo(int(row[0]), row[1], bool(row[2]), row[3], row[4], row[5], row[6], row[7], row[8])


class TokenStore:
    """The tokens of the store on ``db``; ``users`` gives their users' ids."""

    def __init__(self, db: Database, users: UserIds) -> None:
        self.db = db
        self.users = users
        #: See :data:`LAST_USED_PERIOD`.
        self.last_used_period = LAST_USED_PERIOD
        self._last_used: dict[int, float] = {}  # token id -> its latest use, not yet written
        self._last_written: dict[int, float] = {}  # token id -> when its use was written (monotonic)

    async def create(self, user: str, days: float | None = None, admin: bool = False,
                     max_gpus: int | None = None, max_waiting: int | None = None) -> tuple[int, str]:
        """Create a token for ``user`` (made if new); return ``(id, token)``.

        The token itself is returned once and never stored. ``max_gpus`` and
        ``max_waiting`` set this token's quotas (None: the server's default).
        """
        if not user or len(user) > 64 or not user.replace("-", "").replace("_", "").replace(".", "").isalnum() \
                or not user.isascii():
            raise StoreError("a user name is 1 to 64 ASCII letters, digits, '-', '_' and '.'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        expires = now + days * 86400 if days else None
        user_id = await self.users.of(user, create=True)
        row = await self.db.fetchone(
            "INSERT INTO tokens (user_id, hash, admin, created, expires, max_gpus, max_waiting) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (user_id, hash_token(token), int(admin), now, expires, max_gpus, max_waiting),
        )
        assert row is not None
        return int(row[0]), token

    async def all(self) -> list[TokenInfo]:
        """Every token, the oldest first."""
        return [_token(r) for r in await self.db.fetchall(_TOKEN_SELECT + " ORDER BY t.id")]

    async def revoke(self, token_id: int) -> None:
        """Revoke token ``token_id`` now; StoreError if there is none, or it is revoked already."""
        changed = await self.db.execute(
            "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), token_id))
        if changed == 0:
            if await self.db.fetchone("SELECT id FROM tokens WHERE id = ?", (token_id,)) is None:
                raise StoreError(f"no token with id {token_id}")
            raise StoreError(f"token {token_id} is already revoked")

    async def verify(self, token: str | None) -> TokenInfo:
        """Return the token's owner, or raise :class:`TokenError` saying why."""
        if not token:
            raise TokenError("missing token: send 'Authorization: Bearer TOKEN'")
        digest = hash_token(token)
        row = await self.db.fetchone(_TOKEN_SELECT + " WHERE t.hash = ?", (digest,))
        # compare_digest keeps the final comparison constant-time even though
        # the index lookup already found the row by its hash.
        if row is None or not hmac.compare_digest(row[9], digest):
            raise TokenError("invalid token: no such token on this server")
        info = _token(row)
        now = time.time()
        if info.revoked is not None:
            raise TokenError(f"revoked token: token {info.id} was revoked; ask for a new one")
        if info.expires is not None and info.expires < now:
            raise TokenError(f"expired token: token {info.id} expired; ask for a new one")
        self._last_used[info.id] = now
        written = self._last_written.get(info.id)
        if written is None or time.monotonic() - written >= self.last_used_period:
            await self._write_last_used([info.id])
        return info

    async def write_last_used(self, everything: bool = False) -> None:
        """Write the last use of each token whose write is due (its last was
        :data:`LAST_USED_PERIOD` ago), or of every token (``everything``).

        Never raises: a use that cannot be written now waits for the next call.
        """
        mono = time.monotonic()
        due = [token for token in self._last_used if everything
               or mono - self._last_written.get(token, -self.last_used_period) >= self.last_used_period]
        await self._write_last_used(due)

    async def _write_last_used(self, tokens: Sequence[int]) -> None:
        uses = {token: self._last_used.pop(token) for token in tokens if token in self._last_used}
        if not uses:
            return
        mono = time.monotonic()
        for token in uses:
            self._last_written[token] = mono
        try:
            # Never backwards: another server sharing the database may have written a later use.
            await self.db.executemany(
                "UPDATE tokens SET last_used = ? WHERE id = ? AND (last_used IS NULL OR last_used < ?)",
                [(when, token, when) for token, when in uses.items()])
        except (DatabaseUnavailable, OSError, sqlite3.Error) as exc:
            for token, when in uses.items():  # kept for the next write (a later use wins)
                self._last_used[token] = max(when, self._last_used.get(token, when))
            log.warning("could not record when %d token(s) were last used: %s; trying again later",
                        len(uses), exc)
