"""Users in the store: their names and ids, which every other table refers to."""

from __future__ import annotations

import time

from ..errors import StoreError
from .database import Database, Executor

__all__ = ["UserIds"]


class UserIds:
    """The ids of users by name, cached: users are never deleted or renamed,
    and this lookup sits on every cell's path."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._ids: dict[str, int] = {}

    async def of(self, name: str, create: bool = False, tx: Executor | None = None) -> int:
        """``name``'s id; ``create`` makes the user if new (else StoreError);
        ``tx``: within that transaction."""
        cached = self._ids.get(name)
        if cached is not None:
            return cached
        db = tx or self.db
        if create:
            await db.execute("INSERT INTO users (name, created) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                             (name, time.time()))
        row = await db.fetchone("SELECT id FROM users WHERE name = ?", (name,))
        if row is None:
            raise StoreError(f"no user named {name!r}")
        self._ids[name] = int(row[0])
        return self._ids[name]
