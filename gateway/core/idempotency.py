"""Remembers the first result of each step key so a resent step is answered, not run twice —
also while the first run is still in progress, and after a gateway restart. The executor
(gateway/core/executor.py) makes the key: caller, reader, operation, task id and step number.

Finished steps are kept in DATA_DIR/step-memo.sqlite3 (PersistedSteps): the result is
committed (WAL, synchronous=NORMAL: handed to the operating system, which keeps it whatever
becomes of the gateway's process) before the step is answered, so a gateway killed between
running a step and answering it answers the resent step from the file. A step that was
still running when the gateway died has no row: it runs again (docs/stations.md, "Step memo").
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from google.protobuf.message import DecodeError

from shared import convert
from shared.errors import CardlineError, ConfigurationError, PinAttemptsThrottled
from shared.logging import get_logger
from shared.proto import steps_pb2

log = get_logger(__name__)

StepKey = tuple[Hashable, ...]
#: The memo's file in the gateway's data directory.
STEP_MEMO_FILE = "step-memo.sqlite3"
DEFAULT_CAPACITY = 10_000
_SCHEMA_VERSION = 1
_SCHEMA = ("CREATE TABLE IF NOT EXISTS steps (seq INTEGER PRIMARY KEY, step_key TEXT NOT NULL UNIQUE, "
           "outcome BLOB NOT NULL)")
# What SQLite says of a file that is not a memo it can read: it is set aside, not repaired.
_UNREADABLE = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})


def _stored_key(key: StepKey) -> str:
    """The key as the file keeps it: JSON of the tuple (deterministic for str/int/tuples)."""
    return json.dumps(key, separators=(",", ":"))


def _outcome_of(result: Any) -> bytes:
    """What is kept of a step's value or CardlineError: its StepOutcome, the very message the
    caller is answered with. A step's credentials (PINs) are in the step, never in it."""
    if isinstance(result, CardlineError):
        return convert.error_to_outcome(result).SerializeToString()
    return convert.value_to_outcome(result).SerializeToString()


class UnreadableMemo(Exception):
    """The memo file is not a step memo of this version."""


class PersistedSteps:
    """The memo's finished steps on disk, at most CAPACITY, the oldest written dropped first.
    All calls run on one thread of its own (SQLite blocks)."""

    def __init__(self, path: pathlib.Path, capacity: int = DEFAULT_CAPACITY) -> None:
        self.path = path
        self.capacity = capacity
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-memo")
        self._db = self._thread.submit(self._open).result()
        # The keys the file holds (a few stale ones of evicted rows at most, reread when they
        # pile up): a step the file cannot know — every first run — is not looked up on disk.
        self._keys: set[str] = self._thread.submit(self._read_keys).result()

    def _open(self) -> sqlite3.Connection:
        """Opens the file, or sets an unreadable one aside (logged) and starts a fresh memo:
        losing the memo only makes resent steps run again, which a restart mid-step does anyway
        (the orchestrator's journal decides, docs/reconciliation.md). Any other failure (no
        access, disk gone) is a ConfigurationError naming the file."""
        try:
            try:
                return self._connect()
            except (UnreadableMemo, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorname not in _UNREADABLE:
                    raise
                aside = self.path.with_name(self.path.name + ".unreadable")
                log.warning("the step memo file is unreadable; set aside, starting an empty memo (resent steps "
                            "run again)", path=str(self.path), set_aside=str(aside), error=str(exc))
                self.path.replace(aside)
                for sibling in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.with_name(self.path.name + sibling).unlink()
                return self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise ConfigurationError(f"step memo {self.path}: cannot be opened: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        # Created 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and version != _SCHEMA_VERSION:
                raise UnreadableMemo(f"schema version {version}, expected {_SCHEMA_VERSION}")
            if (check := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise UnreadableMemo(f"quick_check: {check}")
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL, not FULL: a commit is in the WAL in the OS's page cache when it returns, so it
            # survives any death of the gateway's process (crash, SIGKILL, OOM, restart); only a
            # power cut or OS crash may take back the last commits, and never half of one. A step
            # taken back is a step the gateway died in: it runs again (the orchestrator's journal
            # decides), as it would with FULL for a cut just before the commit. FULL fsyncs every
            # step: measured 0.4-2.6 ms per step on this project's loaded test machine, against
            # 0.16-0.24 ms with NORMAL (2,000 steps of StepMemo.run in a loop).
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    async def get(self, key: StepKey) -> bytes | None:
        stored = _stored_key(key)
        if stored not in self._keys:
            return None
        return await asyncio.wrap_future(self._thread.submit(self._get, stored))

    async def put(self, key: StepKey, outcome: bytes) -> None:
        """Returns once the row is committed (in the WAL, see _connect)."""
        await asyncio.wrap_future(self._thread.submit(self._put, _stored_key(key), outcome))

    def _get(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT outcome FROM steps WHERE step_key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _put(self, key: str, outcome: bytes) -> None:
        with self._db:                  # one transaction: the row and the eviction it causes
            self._db.execute("BEGIN IMMEDIATE")
            seq = self._db.execute("INSERT OR REPLACE INTO steps (step_key, outcome) VALUES (?, ?)",
                                   (key, outcome)).lastrowid
            assert seq is not None      # an INSERT gives its rowid
            self._db.execute("DELETE FROM steps WHERE seq <= ?", (seq - self.capacity,))
        self._keys.add(key)             # committed: from now on a resend looks it up
        if len(self._keys) > 2 * self.capacity:
            self._keys = self._read_keys()

    def _read_keys(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT step_key FROM steps")}

    def count(self) -> int:
        return self._thread.submit(lambda: self._db.execute("SELECT count(*) FROM steps").fetchone()[0]).result()

    def close(self) -> None:
        self._thread.submit(self._db.close).result()
        self._thread.shutdown()


class StepMemo:
    """In memory: every step of this process, including those still running (a resend waits
    for the first run). With STORE: finished steps also on disk, read when memory has none."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, store: PersistedSteps | None = None) -> None:
        self._capacity = capacity
        self._store = store
        self._results: OrderedDict[StepKey, asyncio.Future] = OrderedDict()
        self._running: set[asyncio.Task] = set()

    async def run(self, key: StepKey | None, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Returns (value, replayed). Errors are remembered like values and raised again.

        The first run of a step belongs to the step, not to its caller: a link that drops
        mid-step cancels the caller, while the card operation goes on (a PKCS#11 or PC/SC call
        in a thread cannot be stopped). The run finishes and is remembered, so the step resent
        after a failover - by another orchestrator replica too - is answered with its outcome
        instead of waiting for a run that was abandoned."""
        if key is None:
            return await work(), False
        first = self._results.get(key)
        if first is not None:
            self._results.move_to_end(key)
            value, _ = await asyncio.shield(first)
            return value, True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._results[key] = future          # before any await: a resend from now on waits for this run
        while len(self._results) > self._capacity:
            self._results.popitem(last=False)
        running = asyncio.create_task(self._settle(key, work, future))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        return await asyncio.shield(future)

    async def _settle(self, key: StepKey, work: Callable[[], Awaitable[Any]], future: asyncio.Future) -> None:
        """Runs the step's first run to its end and resolves FUTURE with (value, replayed) or its error."""
        try:
            outcome = await self._first_run(key, work)
        except asyncio.CancelledError:      # the gateway stops: nothing is remembered, a resend runs it
            self._results.pop(key, None)
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved: a replay re-raises it, nobody else must
            if isinstance(exc, PinAttemptsThrottled):
                self._results.pop(key, None)   # nothing ran: the same step may try again later
            return
        future.set_result(outcome)

    async def _first_run(self, key: StepKey, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """The step's result from the file (a run before a restart), else from running it."""
        stored = await self._stored(key)
        if stored is not None:
            return convert.value_from_outcome(stored), True       # raises a remembered error
        try:
            value = await work()
        except CardlineError as exc:
            if not isinstance(exc, PinAttemptsThrottled):
                await self._record(key, exc)
            raise
        await self._record(key, value)
        return value, False

    async def _stored(self, key: StepKey) -> steps_pb2.StepOutcome | None:
        if self._store is None:
            return None
        raw = await self._store.get(key)
        if raw is None:
            return None
        try:
            return steps_pb2.StepOutcome.FromString(raw)
        except DecodeError as exc:
            log.warning("a remembered step is unreadable; it runs again", key=_stored_key(key), error=str(exc))
            return None

    async def _record(self, key: StepKey, result: Any) -> None:
        """Commits RESULT before the step is answered. A failed write is logged and the
        step still answered: its result is real, and a resend after a restart runs it again,
        as for a step the gateway died in."""
        if self._store is None:
            return
        try:
            await self._store.put(key, _outcome_of(result))
        except (sqlite3.Error, OSError) as exc:
            log.error("step result not recorded in the step memo file; a resend after a restart runs it again",
                      key=_stored_key(key), path=str(self._store.path), error=str(exc))
