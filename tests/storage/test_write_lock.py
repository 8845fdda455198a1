"""SQLite writers queue on SqliteWriteLock: threads of a process, and processes (server workers, a rescan
beside the server) on an flock of the ``<db>-writer`` sidecar, instead of sleeping in SQLite's busy
handler."""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.storage.db import Database, SqliteWriteLock, migrate
from service.storage.errors import WriteLockTimeoutError


def _write_row(url: str, value: int, started: mp.synchronize.Event, done: mp.synchronize.Event) -> None:
    db = Database(url)
    try:
        started.set()
        with db.writing() as conn:
            conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
        done.set()
    finally:
        db.dispose()


def _db(tmp_path: Path) -> tuple[str, Database]:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    migrate(url)
    db = Database(url)
    with db.writing() as conn:
        conn.execute(sa.text("CREATE TABLE t (v INTEGER)"))
    return url, db


def test_another_process_waits_for_the_lock_not_for_sqlite(tmp_path: Path) -> None:
    """The holder of the lock has not begun a SQLite transaction, so only the lock can hold the other
    process back."""
    url, db = _db(tmp_path)
    ctx = mp.get_context("spawn")
    started, done = ctx.Event(), ctx.Event()
    try:
        with db._write_lock:
            child = ctx.Process(target=_write_row, args=(url, 7, started, done))
            child.start()
            assert started.wait(60.0)
            assert not done.wait(1.5)  # it is at its write, and waits
            assert (tmp_path / "w.db-writer").exists()
        assert done.wait(30.0)
        child.join(30)
        assert child.exitcode == 0
        with db.reading() as conn:
            assert conn.execute(sa.text("SELECT v FROM t")).scalars().all() == [7]
    finally:
        db.dispose()


def test_threads_and_nested_writes_of_one_process(tmp_path: Path) -> None:
    _, db = _db(tmp_path)
    try:
        with db.writing() as conn, db._write_lock:  # re-entrant in the thread that holds it
            conn.execute(sa.text("INSERT INTO t (v) VALUES (0)"))

        def many(k: int) -> None:
            for i in range(25):
                with db.writing() as c:
                    c.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), {"v": k * 100 + i})

        threads = [threading.Thread(target=many, args=(k,)) for k in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with db.reading() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 101
    finally:
        db.dispose()


def test_waiting_is_bounded_and_the_lock_is_released_only_by_the_outermost_exit(tmp_path: Path) -> None:
    """Two locks on one file are two sidecar descriptors, so they exclude each other like two processes."""
    path = tmp_path / "x.db"
    path.touch()
    a, b = SqliteWriteLock(path), SqliteWriteLock(path, timeout_s=0.3)
    try:
        with a:
            with a:  # re-entered by its thread
                pass
            started = time.monotonic()
            with pytest.raises(WriteLockTimeoutError, match="another process"), b:
                pass
            assert 0.25 < time.monotonic() - started < 5.0  # the inner exit kept the file locked
        with b:  # free once the outer block is left
            pass
        with pytest.raises(RuntimeError), a:
            raise RuntimeError("a failed write")
        with b:  # released by the failure too
            pass
    finally:
        a.close()
        b.close()


def test_the_sidecar_takes_the_database_files_permissions(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    path.touch()
    path.chmod(0o600)
    lock = SqliteWriteLock(path)
    try:
        with lock:
            pass
        assert (tmp_path / "p.db-writer").stat().st_mode & 0o777 == 0o600
    finally:
        lock.close()


def test_opening_a_database_another_connection_has_locked_waits_for_it(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection writes in the old journal mode fails at once
    with "database is locked" (SQLite's busy handler is not used for it): server workers or migrations
    opening a new database together failed that way (test_concurrent_migrations_all_succeed, ~1 run in
    12)."""
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE t (v INTEGER)")
    threading.Timer(0.5, lambda: holder.execute("COMMIT")).start()
    db = Database(f"sqlite:///{path}")
    try:
        started = time.monotonic()
        with db.reading() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
        assert time.monotonic() - started >= 0.4  # it waited for the lock
    finally:
        db.dispose()
        holder.close()
