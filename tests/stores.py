"""The store from synchronous test code: :class:`BlockingStore`, and :func:`execute_raw`.

The store's methods are coroutines; a test that only wants to set up or
read rows calls them through this wrapper, which runs each one to the end
on a loop of its own (in a thread, so it also works inside a test whose
own event loop is running).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remote_gpu_server.store import Store

__all__ = ["BlockingStore", "execute_raw", "is_postgres"]


def is_postgres(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def execute_raw(location: str | Path, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the store's database behind the store's back (``?`` placeholders);
    returns the rows it gave. For tests that make a store look as another program left it."""
    if is_postgres(location):
        import psycopg

        from remote_gpu_server.store.postgres import to_pyformat

        with psycopg.connect(str(location), autocommit=True) as conn:
            cursor = conn.execute(to_pyformat(sql), args)
            return cursor.fetchall() if cursor.description else []
    db = sqlite3.connect(location, isolation_level=None)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class BlockingStore:
    """``BlockingStore(location)`` opens the store; every coroutine method becomes a plain call."""

    def __init__(self, location: str | Path, server_id: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store: Store = self._run(Store.open(location, server_id))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(attr(*args, **kwargs))

        return call

    def close(self) -> None:
        try:
            self._run(self.store.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
