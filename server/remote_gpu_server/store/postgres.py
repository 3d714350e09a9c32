"""The store's :class:`~.database.Database` on PostgreSQL, for shared deployments.

:class:`PostgresDatabase` runs the store's SQL through psycopg 3 on an
:class:`psycopg_pool.AsyncConnectionPool`: nothing blocks the event loop,
and several servers (and the CLI) can share one database. Plain calls run
in autocommit mode, each its own transaction; :meth:`~PostgresDatabase.transaction`
holds one connection for its statements. The store writes ``?``
placeholders; they become psycopg's ``%s`` here.

Every failure to reach the database (it is down, restarting, the network
is gone, no connection came free in time) raises
:class:`~.database.DatabaseUnavailable`, so callers can tell "try again
later" from a bug. A connection the server dropped while it sat idle in
the pool (the database restarted) is replaced before a call uses it, so
the first calls after a restart do not fail.

Needs the ``postgres`` extra: ``pip install 'remote-gpu-kernel[postgres]'``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..errors import StoreError
from .database import DatabaseUnavailable, Dialect, Executor

try:
    import psycopg
    from psycopg import conninfo
    from psycopg.pq import ConnStatus, TransactionStatus
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise StoreError("a postgresql:// store needs psycopg: pip install 'remote-gpu-kernel[postgres]'") from exc

__all__ = ["POSTGRES", "PostgresDatabase", "describe_url", "to_pyformat"]

log = logging.getLogger("remote_gpu_server")

POSTGRES = Dialect("postgres", "GREATEST")

Row = tuple[Any, ...]
Connection = psycopg.AsyncConnection[Row]


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``sql`` with its ``?`` placeholders as ``%s`` (and a literal ``%`` as ``%%``).

    Quoted text (``'...'`` strings and ``"..."`` names) is copied as it is.
    """
    out: list[str] = []
    quote = ""
    for char in sql:
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "?":
            out.append("%s")
            continue
        if char == "%":
            out.append("%%")
            continue
        out.append(char)
    return "".join(out)


def describe_url(url: str) -> str:
    """The database ``url`` names, for messages: user, host and database, never a password."""
    try:
        parts = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the PostgreSQL database (an unreadable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


def _unavailable(where: str, exc: BaseException) -> DatabaseUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(f"the database {where} is unavailable: {detail}")


class _PostgresExecutor:
    """Statements on one connection (a transaction's)."""

    def __init__(self, conn: Connection, where: str) -> None:
        self._conn = conn
        self._where = where

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            cursor = await self._conn.execute(to_pyformat(sql), args)
        except psycopg.OperationalError as exc:
            raise _unavailable(self._where, exc) from exc
        return max(cursor.rowcount, 0)

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        try:
            cursor = await self._conn.execute(to_pyformat(sql), args)
            return await cursor.fetchone()
        except psycopg.OperationalError as exc:
            raise _unavailable(self._where, exc) from exc

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            cursor = await self._conn.execute(to_pyformat(sql), args)
            return await cursor.fetchall()
        except psycopg.OperationalError as exc:
            raise _unavailable(self._where, exc) from exc

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            async with self._conn.cursor() as cursor:
                await cursor.executemany(to_pyformat(sql), rows)
        except psycopg.OperationalError as exc:
            raise _unavailable(self._where, exc) from exc


class PostgresDatabase:
    """Open with :meth:`connect`; call :meth:`close` when done.

    ``timeout`` bounds how long a call waits for a connection (the database
    is down or every connection is busy) before it raises
    :class:`DatabaseUnavailable`.
    """

    dialect = POSTGRES

    def __init__(self, pool: AsyncConnectionPool[Connection], where: str, timeout: float) -> None:
        self._pool = pool
        self.where = where
        self.timeout = timeout

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 1, max_size: int = 8,
                      timeout: float = 3.0) -> PostgresDatabase:
        """A pool of connections to ``url``; raises :class:`DatabaseUnavailable`
        saying why when the database cannot be reached (wrong host, user or
        database name, refused password)."""
        where = describe_url(url)
        try:
            # One connection first: its error says what is wrong, where the
            # pool would only say that it timed out.
            probe = await psycopg.AsyncConnection.connect(url, connect_timeout=max(2, int(timeout)))
        except psycopg.OperationalError as exc:
            raise _unavailable(where, exc) from exc
        except psycopg.ProgrammingError as exc:  # a malformed URL
            raise StoreError(f"{where}: {exc}") from exc
        await probe.close()
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, timeout=timeout,
            kwargs={"autocommit": True, "connect_timeout": max(2, int(timeout))},
            # The pool retries a lost connection with a pause that doubles;
            # past this it gives up, and the next call asks for a new one at
            # once: a database back after a long outage is used within seconds.
            reconnect_timeout=10.0, name="rgpu-store")
        try:
            await pool.open(wait=True, timeout=timeout * 2)
        except psycopg.OperationalError as exc:
            await pool.close()
            raise _unavailable(where, exc) from exc
        return cls(pool, where, timeout)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A working connection from the pool, given back at the end."""
        conn = await self._getconn()
        try:
            yield conn
        finally:
            if conn.pgconn.transaction_status not in (TransactionStatus.IDLE, TransactionStatus.UNKNOWN):
                with contextlib.suppress(psycopg.Error):
                    await conn.rollback()
            await self._pool.putconn(conn)

    async def _getconn(self) -> Connection:
        # A connection that the server closed while it sat in the pool (the
        # database restarted) goes back, to be replaced, and the next is tried,
        # so a restart costs no failed call. The pool's own check would pause
        # a second per dead connection, and its cheapest costs a round trip on
        # every call: a dead connection is told by its socket, which a closing
        # server leaves readable.
        for _ in range(self._pool.max_size + 1):
            try:
                conn = await self._pool.getconn(self.timeout)
            except psycopg.OperationalError as exc:  # also the pool's PoolTimeout and PoolClosed
                raise _unavailable(self.where, exc) from exc
            try:
                alive = await _alive(conn)
            except BaseException:  # cancelled while checking: the connection still goes back
                await self._pool.putconn(conn)
                raise
            if alive:
                return conn
            log.info("the store's connection to %s was lost while idle: replacing it", self.where)
            await self._pool.putconn(conn)
        raise DatabaseUnavailable(f"the database {self.where} is unavailable: every connection was lost")

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._connection() as conn:
            return await _PostgresExecutor(conn, self.where).execute(sql, args)

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        async with self._connection() as conn:
            return await _PostgresExecutor(conn, self.where).fetchone(sql, args)

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        async with self._connection() as conn:
            return await _PostgresExecutor(conn, self.where).fetchall(sql, args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self.transaction() as tx:
            await tx.executemany(sql, rows)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    yield _PostgresExecutor(conn, self.where)
            except psycopg.OperationalError as exc:  # the COMMIT itself failed
                raise _unavailable(self.where, exc) from exc

    async def close(self) -> None:
        await self._pool.close()


async def _alive(conn: Connection) -> bool:
    """Whether an idle connection from the pool still works."""
    if conn.closed or conn.pgconn.status != ConnStatus.OK:
        return False
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if not readable:
        return True  # an idle connection the server has said nothing on
    try:
        await conn.execute("")  # most likely the server's goodbye: read it
    except psycopg.Error:
        return False
    return True
