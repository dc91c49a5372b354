"""The engine and the session factory every part of the store shares.

Each public store method is one transaction: `write()` for one that changes rows, `read()`
for one that only reads. A Store is shared by many threads: each call opens its own session,
and the engine's pool hands each thread its own connection. Inside `one_transaction()` the
store methods a thread calls join that block's write transaction instead (Store.together):
they commit together or not at all.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 10_000


def private_database_file(path: pathlib.Path) -> None:
    """Creates the SQLite database file 0600 before SQLite opens it (and takes group and other
    access away from an existing one and its -wal/-shm files): SQLite creates the -wal and -shm
    files with the database file's permissions, so they are private too. The store holds
    sealed secrets and the audit; nobody but the orchestrator's user reads it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def make_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # pre_ping: a PostgreSQL restart must not surface as an error on the next call.
        return create_engine(url, pool_pre_ping=True)

    memory = url.database in (None, "", ":memory:")
    if memory:
        # One shared connection, or every thread would see its own empty database.
        # Good for single-threaded tools and tests only.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        private_database_file(pathlib.Path(str(url.database)))
        engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Take BEGIN away from the sqlite3 module (it starts transactions lazily, at the first
        # write, so a read-then-write could interleave with another writer); _on_begin below
        # emits it instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")            # off by default in SQLite
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # wait for the writer, don't fail
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")       # readers don't block the writer
            cur.execute("PRAGMA synchronous=NORMAL")     # WAL + NORMAL is durable across app crashes
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: upgrading a read transaction to a write one
        # fails at once with "database is locked" instead of waiting for busy_timeout.
        write = conn.get_execution_options().get("cardline_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Sessions:
    """One engine and its two session factories (reading, writing), shared by the store's parts.

    SQLite has one writer at a time; a writer that finds the write lock taken waits in SQLite's
    busy handler, which sleeps in steps of up to 100 ms however soon the lock is free. So this
    process's writers take their turn on a lock of their own first (woken as soon as it is
    released): SQLite's busy wait is left for writers of other processes (the CLI)."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self.write_engine = self.engine.execution_options(cardline_write=True)
        self._reading = sessionmaker(self.engine, expire_on_commit=False)
        self._writing = sessionmaker(self.write_engine, expire_on_commit=False)
        self._joined = threading.local()      # .session: this thread's one_transaction(), if open
        self._writer = threading.RLock() if self.engine.dialect.name == "sqlite" else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def write(self) -> Iterator[Session]:
        joined = self._joined_session()
        if joined is not None:
            yield joined
            return
        with self.write_turn(), self._writing() as session, session.begin():
            yield session

    @contextmanager
    def write_turn(self) -> Iterator[None]:
        """This thread's turn among the process's SQLite writers (a no-op on PostgreSQL, whose
        writers lock rows, not the database). Not had within SQLite's busy timeout: the
        transaction goes on to SQLite's own wait, which decides as it would without it."""
        if self._writer is None:
            yield
            return
        mine = self._writer.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            yield
        finally:
            if mine:
                self._writer.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        joined = self._joined_session()
        if joined is not None:          # reads what the block has written so far
            yield joined
            return
        with self._reading() as session, session.begin():
            yield session

    @contextmanager
    def one_transaction(self) -> Iterator[Session]:
        """One write transaction that every write() and read() of this thread joins until the
        block ends: committed when it ends, rolled back whole when anything in it raises."""
        if self._joined_session() is not None:
            raise RuntimeError("one_transaction() is already open in this thread")
        with self.write_turn(), self._writing() as session, session.begin():
            self._joined.session = session
            try:
                yield session
            finally:
                self._joined.session = None

    def _joined_session(self) -> Session | None:
        return getattr(self._joined, "session", None)

    def insert(self, table: Any) -> Any:
        """INSERT with this backend's ON CONFLICT clauses (PostgreSQL and SQLite spell them alike)."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def close(self) -> None:
        self.engine.dispose()
