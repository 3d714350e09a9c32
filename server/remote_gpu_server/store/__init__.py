"""The server's store: users, tokens, sessions, jobs and the output journal.

One interface, :class:`Store` (every method a coroutine), over two
databases: SQLite, the embedded default (a file; its calls run on a thread
of their own), and PostgreSQL for shared deployments (a
``postgresql://`` URL; ``pip install 'remote-gpu-kernel[postgres]'``).
``await Store.open(location, server_id)`` opens either and brings its
schema up to date (:mod:`.schema`).
"""

from __future__ import annotations

from .base import Store
from .tokens import TOKEN_PREFIX, hash_token
from .database import Database, DatabaseUnavailable, Dialect, SqliteDatabase
from .parked import ParkedRecord, ParkedStore
from .records import (
    JOB_STATES, AttemptRecord, BatchSpec, CellRecord, JobRecord, JobState, OutputRow, SessionRecord,
    TokenInfo, slot_count
)
from .schema import SCHEMA_VERSION, SchemaTooNew

__all__ = [
    "AttemptRecord", "BatchSpec", "CellRecord", "Database", "DatabaseUnavailable", "Dialect", "JOB_STATES",
    "JobRecord", "JobState", "OutputRow", "ParkedRecord", "ParkedStore", "SCHEMA_VERSION", "SchemaTooNew", "SessionRecord",
    "SqliteDatabase", "Store", "TOKEN_PREFIX", "TokenInfo", "hash_token", "slot_count",
]
