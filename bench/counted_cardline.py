"""`cardline` with the store's transactions counted, for bench/overhead.py (B1).

Registers SQLAlchemy listeners on every engine that count read and write transactions (at
BEGIN: the store emits BEGIN IMMEDIATE for writers, BEGIN for readers,
orchestrator/store/sessions.py) and the time writers waited for SQLite's write lock (their
turn among the process's writers, Sessions.write_turn, then BEGIN IMMEDIATE), into the file
named by CARDLINE_BENCH_TRANSACTION_COUNTER; then runs the `cardline` command with the given
arguments. Bench-only: the product never imports it.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import struct
import sys
import threading
import time
from collections.abc import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.launch import COUNTER_ENV, COUNTER_FORMAT, map_counter
from orchestrator.store.sessions import Sessions
from shared.cli import main


def count_transactions(path: str) -> None:
    counts = map_counter(path)
    lock = threading.Lock()             # the store runs in worker threads

    def add(reads: int = 0, writes: int = 0, waited_us: int = 0) -> None:
        with lock:
            old = struct.unpack_from(COUNTER_FORMAT, counts)
            struct.pack_into(COUNTER_FORMAT, counts, 0, old[0] + reads, old[1] + writes, old[2] + waited_us)

    @event.listens_for(Engine, "begin")
    def _on_begin(conn) -> None:
        write = bool(conn.get_execution_options().get("cardline_write", False))
        add(reads=not write, writes=write)

    # SQLite writers start with BEGIN IMMEDIATE (orchestrator/store/sessions.py), which waits
    # (busy_timeout) while another connection holds the write lock: how long, in total.
    @event.listens_for(Engine, "before_cursor_execute")
    def _before(conn, _cursor, statement, *_args) -> None:
        if statement.startswith("BEGIN IMMEDIATE"):
            conn.info["bench_begin_immediate"] = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(conn, _cursor, statement, *_args) -> None:
        started = conn.info.pop("bench_begin_immediate", None) if statement.startswith("BEGIN IMMEDIATE") else None
        if started is not None:
            add(waited_us=round((time.perf_counter() - started) * 1e6))


    # This process's writers first wait for their turn among themselves (Sessions.write_turn,
    # SQLite only), then in BEGIN IMMEDIATE for writers of other processes: both are counted.
    turn = Sessions.write_turn

    @contextlib.contextmanager
    def timed_turn(self: Sessions) -> Iterator[None]:
        started = time.perf_counter()
        with turn(self):
            add(waited_us=round((time.perf_counter() - started) * 1e6))
            yield

    Sessions.write_turn = timed_turn  # type: ignore[method-assign]


if __name__ == "__main__":
    count_transactions(os.environ[COUNTER_ENV])
    sys.argv[0] = "cardline"
    main()
