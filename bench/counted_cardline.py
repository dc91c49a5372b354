"""`cardline` with the store's transactions counted, for bench/overhead.py (B1).

Registers a SQLAlchemy listener on every engine's BEGIN (the store emits BEGIN IMMEDIATE
for writers, BEGIN for readers: orchestrator/store/sessions.py) that counts read and write
transactions into the file named by CARDLINE_BENCH_TRANSACTION_COUNTER, then runs the
`cardline` command with the given arguments. Bench-only: the product never imports it.
"""
from __future__ import annotations

import os
import pathlib
import struct
import sys
import threading

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sqlalchemy import event
from sqlalchemy.engine import Engine

from bench.launch import COUNTER_ENV, COUNTER_FORMAT, map_counter
from shared.cli import main


def count_transactions(path: str) -> None:
    counts = map_counter(path)
    lock = threading.Lock()             # the store runs in worker threads

    @event.listens_for(Engine, "begin")
    def _on_begin(conn) -> None:
        write = bool(conn.get_execution_options().get("cardline_write", False))
        with lock:
            reads, writes = struct.unpack_from(COUNTER_FORMAT, counts)
            struct.pack_into(COUNTER_FORMAT, counts, 0, reads + (not write), writes + write)


if __name__ == "__main__":
    count_transactions(os.environ[COUNTER_ENV])
    sys.argv[0] = "cardline"
    main()
