"""Engines, sessions and migrations: everything that knows which database is behind the URL.

:class:`Database` owns one engine and hands out short sessions: :meth:`Database.read` and
:meth:`Database.write` each wrap one transaction, so repositories open one per public call and can be
used from many threads at once.

SQLite specifics, set on every new connection: WAL (readers never wait for the writer), foreign keys
on, a busy timeout, ``synchronous=NORMAL`` (durable at checkpoints; WAL keeps the file consistent).
BEGIN is emitted when SQLAlchemy begins a transaction (its ``begin`` event) rather than when the sqlite3
module would (it skips it before SELECTs and DDL), and write transactions start with
``BEGIN IMMEDIATE``: a deferred transaction that read first and then wants to write fails at once with
"database is locked" when another writer got there in between, whatever the busy timeout.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.storage.errors import InvalidInputError, WriteLockTimeoutError

try:
    import fcntl
except ImportError:  # Windows: SqliteWriteLock queues threads only
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("counterlens.storage")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Any fixed 64-bit number: the PostgreSQL advisory lock that serialises concurrent ``migrate`` calls.
_PG_MIGRATION_LOCK = 0x636C5F6D69677261
_WRITE_OPTION = "counterlens_write"


def json_default(value: object) -> Any:
    # Signal evidence may carry numpy scalars or arrays; store them as plain JSON numbers and lists.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_dumps(value: object) -> str:
    return json.dumps(value, default=json_default, separators=(",", ":"), allow_nan=False)


def parse_url(database_url: str) -> URL:
    """The URL, checked: only SQLite files and PostgreSQL; in-memory SQLite is refused (each pooled
    connection would see its own empty database)."""
    try:
        url = make_url(database_url)
    except Exception as exc:  # sqlalchemy raises ArgumentError, but be strict about any failure
        raise InvalidInputError(f"storage.database_url is not a database URL: {exc}",
                                "storage.database_url") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise InvalidInputError(f"storage.database_url must be sqlite or postgresql, got {backend!r}",
                                "storage.database_url")
    if backend == "sqlite" and (not url.database or url.database == ":memory:"
                                or url.query.get("mode") == "memory"):
        raise InvalidInputError("storage.database_url: in-memory SQLite is not supported, use a file",
                                "storage.database_url")
    return url


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    name = url.database
    if name.startswith("file:"):
        name = name[len("file:"):].split("?", 1)[0]
    return Path(name)


def create_engine(database_url: str, *, echo: bool = False, pool_size: int = 8) -> Engine:
    """An engine for the URL, with the SQLite connection set-up described in the module docstring.

    The parent folder of a SQLite file is created.
    """
    url = parse_url(database_url)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": json_dumps, "pool_size": pool_size,
                              "max_overflow": pool_size * 2, "pool_timeout": 60}
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        engine = sa.create_engine(url, **kwargs)
        _install_sqlite_hooks(engine)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, **kwargs)
    return engine


def _ensure_wal(cur: Any) -> None:
    """Put the file in WAL mode (a property of the file: kept once set, so usually only read here).

    Switching needs an exclusive lock, for which SQLite answers "database is locked" at once instead of
    waiting in its busy handler: several processes or threads opening a new database together (server
    workers, concurrent migrations) failed that way. So a locked switch is retried until the busy timeout.
    """
    deadline, pause = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000, 0.001
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it would skip it before SELECTs and DDL).
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            _ensure_wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        # On the sqlite3 connection itself rather than through SQLAlchemy's execution machinery
        # (exec_driver_sql): an empty transaction then costs 14.8 us of CPU instead of 24.6 (read) and
        # 22.4 instead of 33.5 (write; 2-core VM), and a scored batch opens four.
        driver = conn.connection.driver_connection
        assert driver is not None  # a checked-out connection always has its sqlite3 connection
        driver.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


class SqliteWriteLock:
    """Queues the writers of one SQLite file: the threads of a process on a re-entrant lock, processes
    (``serve --workers N``, a rescan beside the server) on an ``flock`` of a sidecar file ``<db>-writer``.

    Both hand over as soon as the writer is done. Without them a writer that finds the database locked
    sleeps in SQLite's busy handler (1, 2, 5, 10 ... 100 ms): with two server processes that halved
    what the second one added. The busy timeout still covers writers that do not take this lock (the
    ``sqlite3`` shell, another program).

    Waiting is bounded like SQLite's own (``timeout_s``, the busy timeout): a writer that hangs inside its
    transaction makes the others fail with :class:`WriteLockTimeoutError` instead of waiting forever. The
    sidecar is created with the database file's permissions and opened read-only where it cannot be
    written (``flock`` needs no write access). Where ``fcntl`` is missing (Windows), or the sidecar cannot
    be opened at all (a read-only folder: then nothing can write the database either), only threads are
    queued.
    """

    def __init__(self, path: Path | None, timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> None:
        self._threads = threading.RLock()
        self._depth = 0  # re-entries of the thread holding ``_threads``
        self._db_path = path
        self._path = None if path is None or fcntl is None else path.with_name(path.name + "-writer")
        self._timeout_s = timeout_s
        self._fd: int | None = None
        self._fd_pid = 0

    def _file(self) -> int | None:
        """The sidecar's descriptor for this process (a forked child opens its own), or None."""
        if self._path is None:
            return None
        if self._fd is None or self._fd_pid != os.getpid():
            try:
                mode = self._db_path.stat().st_mode & 0o666 if self._db_path is not None else 0o644
            except OSError:
                mode = 0o644
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
            except PermissionError:
                try:
                    fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    log.warning("cannot open %s (%s): writers of other processes are not queued", self._path, exc)
                    self._path = None
                    return None
            self._fd, self._fd_pid = fd, os.getpid()
        return self._fd

    def _flock(self, fd: int) -> None:
        assert fcntl is not None
        # A blocking flock cannot time out, so poll: at once (the common case, free), then in 0.2-2 ms
        # steps, which keep the hand-over quick next to SQLite's 1-100 ms sleeps; a poll is one system call.
        deadline, pause = time.monotonic() + self._timeout_s, 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise WriteLockTimeoutError(
                    f"another process has been writing {self._db_path} for over {self._timeout_s:.0f} s", None)
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def __enter__(self) -> SqliteWriteLock:
        if not self._threads.acquire(timeout=self._timeout_s):
            raise WriteLockTimeoutError(f"another thread has been writing {self._db_path} for over "
                                        f"{self._timeout_s:.0f} s", None)
        if self._depth == 0:
            try:
                fd = self._file()
                if fd is not None:
                    self._flock(fd)
            except BaseException:
                self._threads.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None and self._fd_pid == os.getpid():
                assert fcntl is not None
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def after_fork(self) -> None:
        """In a forked child: a fresh thread lock (a parent thread may have held the old one at the fork,
        and no thread of the child will ever release it); the sidecar reopens by itself (``_file``)."""
        self._threads = threading.RLock()
        self._depth = 0

    def close(self) -> None:
        """Close the sidecar (after the writers of this process are done: taken under the lock)."""
        with self._threads:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None


class Database:
    """One engine and its session factories; ``read()``/``write()`` give one-transaction sessions."""

    def __init__(self, database_url: str, *, echo: bool = False, pool_size: int = 8) -> None:
        self.url = parse_url(database_url)
        self.engine = create_engine(database_url, echo=echo, pool_size=pool_size)
        self.dialect = self.engine.dialect.name  # "sqlite" | "postgresql"
        self._write_engine = self.engine.execution_options(**{_WRITE_OPTION: True})
        self._reader = sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False, autoflush=False)
        # SQLite admits one writer. Writers queue on SqliteWriteLock, which hands over in microseconds;
        # without it a writer that finds the database locked sleeps in SQLite's busy handler (1, 2, 5,
        # 10 ... 100 ms), which put second-long tails on /v1/score latency when model threads stored
        # embeddings while another thread stored scores. PostgreSQL takes concurrent writers as they come.
        self._write_lock: AbstractContextManager[Any] = (
            SqliteWriteLock(_sqlite_file(self.url)) if self.dialect == "sqlite" else nullcontext())

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in one read transaction (a consistent snapshot), closed at the end."""
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in one write transaction, committed at the end or rolled back on error."""
        with self._write_lock, self._writer() as session, session.begin():
            yield session

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A Core connection in one read transaction: for the hot paths, which skip the ORM session."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A Core connection in one write transaction, committed at the end or rolled back on error."""
        with self._write_lock, self._write_engine.connect() as conn, conn.begin():
            yield conn

    def migrate(self) -> str:
        """Brings the schema to the newest revision (see :func:`migrate_engine`)."""
        return migrate_engine(self.engine)

    def before_fork(self) -> None:
        """Close the pooled connections, so that a process forked next inherits none: an SQLite
        connection must not be used across a fork, and a PostgreSQL socket shared by two processes would
        mix their replies. The parent reconnects at its next query."""
        self.engine.dispose()

    def after_fork(self) -> None:
        """In a forked child, before its first query: forget whatever the parent's pool held (without
        closing it: it is the parent's) and take a write lock of its own."""
        self.engine.dispose(close=False)
        if isinstance(self._write_lock, SqliteWriteLock):
            self._write_lock.after_fork()

    def dispose(self) -> None:
        self.engine.dispose()
        if isinstance(self._write_lock, SqliteWriteLock):
            self._write_lock.close()

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"


def alembic_config() -> Config:
    """The Alembic configuration of the packaged migrations (no alembic.ini needed).

    To write a new revision during development::

        cfg = alembic_config()
        with Database(url).engine.begin() as conn:
            cfg.attributes["connection"] = conn
            alembic.command.revision(cfg, message="...", autogenerate=True)
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations packaged"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate_engine(engine: Engine) -> str:
    """Upgrades the database behind ``engine`` to head in one transaction and returns the revision.

    Safe to call from several processes starting at once: SQLite serialises them with ``BEGIN
    IMMEDIATE`` (DDL is transactional there too, as SQLAlchemy emits BEGIN), PostgreSQL with an
    advisory lock; the later callers find the schema current and do nothing.
    """
    cfg = alembic_config()
    with engine.execution_options(**{_WRITE_OPTION: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    assert after is not None
    return after


def migrate(database_url: str) -> str:
    """Upgrades the database at ``database_url`` to the newest revision (``alembic upgrade head``)."""
    engine = create_engine(database_url, pool_size=1)
    try:
        return migrate_engine(engine)
    finally:
        engine.dispose()
