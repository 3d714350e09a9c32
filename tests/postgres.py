"""A real PostgreSQL server of the tests' own: :class:`PostgresCluster`.

``initdb`` makes a cluster in a temporary folder and ``pg_ctl`` runs it,
listening only on a Unix socket in that folder (``listen_addresses=''``),
so nothing else on the machine can reach it and tests on one machine never
collide. ``initdb`` refuses to run as root: as root, both run as the
``postgres`` user that Debian's ``postgresql`` package makes. Each test
takes a database of its own (:meth:`PostgresCluster.database`).

:func:`unavailable` says why there is no PostgreSQL to run (the tests that
need it skip with that reason).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

__all__ = ["BACKENDS", "PostgresCluster", "require", "unavailable"]

#: The store's backends, as tests parametrize over them.
BACKENDS = ["sqlite", "postgres"]

_NAMES = itertools.count(1)


def _bindir() -> Path | None:
    """Debian keeps the server's programs in /usr/lib/postgresql/VERSION/bin, off the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_root() -> bool:
    return os.geteuid() == 0


def unavailable() -> str | None:
    """Why PostgreSQL cannot run here, or None when it can."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[dev]'"
    if _bindir() is None:
        return ("PostgreSQL is not installed: run scripts/setup.sh as root, or apt-get install postgresql")
    if _as_root():
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user for initdb to run as"
        if shutil.which("runuser") is None:
            return "running as root, and there is no runuser to run initdb as 'postgres'"
    return None


def require() -> None:
    """Skip the calling test where PostgreSQL cannot run; in CI (``CI`` set) fail it
    instead, since the project's setup installs PostgreSQL there."""
    import pytest

    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


class PostgresCluster:
    """``PostgresCluster().start()`` ... ``destroy()``; superuser ``postgres``, no password.

    ``durable=False`` (for tests) turns off fsync; benchmarks keep PostgreSQL's defaults.
    """

    def __init__(self, durable: bool = False) -> None:
        bindir = _bindir()
        assert bindir is not None, unavailable()
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="rgpu-pg-"))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self._prefix: list[str] = []
        if _as_root():
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            # Only a socket in our folder, and room for many servers' pools.
            conf.write(f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\nport = 5432\n"
                       "max_connections = 300\n")
            if not durable:  # an immediate stop still keeps what was committed: the WAL is in the page cache
                conf.write("fsync = off\nfull_page_writes = off\n")

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._prefix, str(self.bindir / program), *args], check=True,
                              capture_output=True, text=True, cwd=self.root)

    def start(self) -> PostgresCluster:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start")
        except subprocess.CalledProcessError as exc:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr}\n{log}") from exc
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``; ``immediate`` is a crash (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.root}"

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        import psycopg

        name = f"rgpu_test_{os.getpid()}_{next(_NAMES)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new database's URL, dropped at the end.

        Meanwhile ``$XDG_DATA_HOME`` is a new folder of the database's own: a
        server whose store is a URL keeps its files there (uid mapping,
        certificates, session folders; ``config.data_dir``), and servers of
        different databases must not share them, nor leave them in ``~``."""
        name = self.create_database()
        with tempfile.TemporaryDirectory(prefix=f"{name}-data-", ignore_cleanup_errors=True) as data_home:
            try:
                with mock.patch.dict(os.environ, {"XDG_DATA_HOME": data_home}):
                    yield self.url(name)
            finally:
                self.drop_database(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
