"""The orchestrator's SQLite writers take turns on a lock of their own before BEGIN IMMEDIATE
(orchestrator/store/sessions.py): a writer of the process never waits in SQLite's busy
handler (which sleeps in steps of up to 100 ms) for another writer of the same process."""
from __future__ import annotations

import threading
import uuid

from sqlalchemy import event, text

from orchestrator.store.sessions import Sessions


def test_no_write_transaction_begins_while_another_of_the_process_is_open(tmp_path):
    sessions = Sessions(f"sqlite:///{tmp_path / 'turns.db'}")
    with sessions.write() as s:
        s.execute(text("CREATE TABLE t (id TEXT PRIMARY KEY)"))
    guard = threading.Lock()
    open_writes = 0
    overlaps: list[int] = []

    @event.listens_for(sessions.engine, "before_cursor_execute")
    def _before(_conn, _cursor, statement, *_args) -> None:
        nonlocal open_writes
        if statement.startswith("BEGIN IMMEDIATE"):
            with guard:
                if open_writes:
                    overlaps.append(open_writes)
                open_writes += 1

    @event.listens_for(sessions.engine, "commit")
    def _commit(conn) -> None:
        nonlocal open_writes
        if conn.get_execution_options().get("cardline_write"):
            with guard:
                open_writes -= 1

    start = threading.Barrier(6)

    def writer() -> None:
        start.wait()
        for _ in range(40):
            with sessions.write() as s:
                s.execute(text("INSERT INTO t (id) VALUES (:id)"), {"id": uuid.uuid4().hex})

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with sessions.read() as s:
        assert s.scalar(text("SELECT count(*) FROM t")) == 240
    assert overlaps == []
    sessions.close()


def test_a_write_inside_one_transaction_of_the_same_thread_joins_it_without_waiting_for_its_turn(tmp_path):
    sessions = Sessions(f"sqlite:///{tmp_path / 'joined.db'}")
    with sessions.one_transaction() as outer:
        outer.execute(text("CREATE TABLE t (id TEXT PRIMARY KEY)"))
        with sessions.write() as inner:
            assert inner is outer
            inner.execute(text("INSERT INTO t (id) VALUES ('a')"))
    with sessions.read() as s:
        assert s.scalar(text("SELECT count(*) FROM t")) == 1
    sessions.close()
