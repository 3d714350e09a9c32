"""The narrow database interface the store is written against, and SQLite's.

:class:`Store` (in :mod:`.base`) holds every query and rule once; a
:class:`Database` runs its SQL. SQL is written with ``?`` placeholders; a
backend that wants another style converts them. What differs between the
engines beyond that (a scalar maximum, the DDL) is in :class:`Dialect` and
:mod:`.schema`.

:class:`SqliteDatabase` keeps its files readable by their owner alone
(0600, whatever the umask), and runs every call on one thread of its own,
so a slow disk, or a CLI write holding SQLite's lock (``busy_timeout``),
never stalls the server's event loop. Calls are serialised by an asyncio lock,
so a transaction (several calls) is never interleaved with another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import DatabaseUnavailable

__all__ = ["Database", "DatabaseUnavailable", "Dialect", "Executor", "SQLITE", "SqliteDatabase"]

T = TypeVar("T")
Row = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Dialect:
    """What differs in the SQL the store writes."""

    name: str
    #: The scalar maximum of two values.
    greatest: str


SQLITE = Dialect("sqlite", "MAX")


class Executor(Protocol):
    """Runs statements; each call on a :class:`Database` is its own transaction."""

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(Executor, Protocol):
    dialect: Dialect

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Executor]:
        """Statements inside run as one transaction: all or none."""

    async def close(self) -> None: ...


class _SqliteExecutor:
    """Statements on the database's thread; the caller holds its lock."""

    def __init__(self, owner: SqliteDatabase) -> None:
        self._owner = owner

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return await self._owner._call(lambda db: db.execute(sql, args).rowcount)

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row = await self._owner._call(lambda db: db.execute(sql, args).fetchone())
        return tuple(row) if row is not None else None

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return await self._owner._call(lambda db: [tuple(r) for r in db.execute(sql, args).fetchall()])

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._owner._call(lambda db: db.executemany(sql, rows))


class SqliteDatabase:
    """One SQLite file in WAL mode, used from one thread of its own.

    Call :meth:`open` (on the event loop) before anything else and
    :meth:`close` at the end.
    """

    dialect = SQLITE

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rgpu-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._plain = _SqliteExecutor(self)

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _private(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("PRAGMA foreign_keys=ON")
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise DatabaseUnavailable(f"the store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, db)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._lock:
            return await self._plain.execute(sql, args)

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._lock:
            return await self._plain.fetchone(sql, args)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._lock:
            return await self._plain.fetchall(sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._lock:
            await self._call(lambda db: _in_transaction(db, lambda: db.executemany(sql, rows)))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._lock:
            # IMMEDIATE takes the write lock at once: two processes that both
            # read then write could otherwise deadlock on the upgrade.
            await self._call(lambda db: db.execute("BEGIN IMMEDIATE"))
            try:
                yield self._plain
            except BaseException:
                await self._call(lambda db: db.execute("ROLLBACK"))
                raise
            await self._call(lambda db: db.execute("COMMIT"))

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        self._thread.shutdown(wait=True)


#: The files of one SQLite store: the database, and its WAL, shared memory and rollback journal.
_STORE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _private(path: Path) -> None:
    """Make the store at ``path`` readable by its owner alone, whatever the umask.

    The file is created 0600 if missing; an existing one of ours (and its
    ``-wal``, ``-shm``, ``-journal``) loses any group and other bits.
    SQLite gives the files it creates later the database file's mode, so
    they are private too. The store holds every user's code and output.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        pass
    for suffix in _STORE_SUFFIXES:
        name = path.with_name(path.name + suffix)
        try:
            info = os.lstat(name)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_mode & 0o077:
            os.chmod(name, stat.S_IMODE(info.st_mode) & 0o600)


def _in_transaction(db: sqlite3.Connection, work: Callable[[], Any]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
