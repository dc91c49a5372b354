"""The audit trail's hash chain (docs/audit.md): each row stores the hash of the previous
row (`prev_hash`) and its own `hash` = SHA-256 of (prev_hash, newline, the row's canonical
content). The first row follows GENESIS.

Verifying walks the chain by its links, not by the rows' ids, so it can say what happened:
a row whose content no longer matches its hash was *edited*; a row that follows a hash no
row has means rows before it were *deleted* (or the row before it rewritten with a new
hash); a row the chain does not pass through was *inserted*; a chain that passes rows in
another order than their ids means rows were *reordered*. Pure code: no database here.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise
from typing import Any

GENESIS = "0" * 64
#: The fields of a row the hash covers, in the canonical JSON. The id is not among them:
#: the chain itself fixes the order, so rows that swap ids are found as reordered.
CHAINED_FIELDS = ("at", "actor", "action", "object_type", "object_id", "card_id", "task_id", "gateway_id",
                  "reader_id", "step", "certificates", "detail")


def canonical(fields: Mapping[str, Any]) -> str:
    """The canonical text of a row: its CHAINED_FIELDS as JSON with sorted keys, no spaces,
    ASCII only; `at` as ISO 8601 UTC with microseconds; no certificates as [].

    Frozen: every stored hash (and migration 0008_audit_hash_chain) depends on it. A new
    audit column joins the chain only through a new canonical form with a migration that
    re-chains, never by changing this one."""
    at = fields["at"]
    if not isinstance(at, dt.datetime) or at.tzinfo is None:
        raise ValueError(f"audit time must be an aware datetime, not {at!r}")
    values = {name: fields.get(name) for name in CHAINED_FIELDS}
    values["at"] = at.astimezone(dt.UTC).isoformat(timespec="microseconds")
    values["certificates"] = values["certificates"] or []
    values["detail"] = values["detail"] or {}
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def link_hash(prev_hash: str, content: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{content}".encode()).hexdigest()


class ChainFault(StrEnum):
    EDITED = "edited"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"


@dataclass(frozen=True)
class ChainedRow:
    """What verifying needs of a row: its id, its links and whether its content still
    matches its hash (computed by the caller while reading, so rows need not stay in memory)."""
    id: int
    prev_hash: str | None
    hash: str | None
    content_matches: bool


def chained_row(row_id: int, prev_hash: str | None, row_hash: str | None, fields: Mapping[str, Any]) -> ChainedRow:
    matches = prev_hash is not None and row_hash == link_hash(prev_hash, canonical(fields))
    return ChainedRow(row_id, prev_hash, row_hash, matches)


@dataclass(frozen=True)
class ChainProblem:
    row_id: int
    fault: ChainFault
    message: str


@dataclass(frozen=True)
class ChainReport:
    rows: int
    head: str                       # the hash of the chain's last row (GENESIS when empty)
    problems: tuple[ChainProblem, ...]

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def first(self) -> ChainProblem | None:
        return self.problems[0] if self.problems else None


def verify_chain(rows: Iterable[ChainedRow], *, expected_head: str | None = None) -> ChainReport:
    """Checks the chain of ROWS (any order); problems sorted by row id, the first bad row first.
    expected_head: a head hash noted earlier (`cardline audit verify` prints it); the newest
    rows deleted leave a shorter chain that is otherwise intact, and lose that hash."""
    ordered = sorted(rows, key=lambda r: r.id)
    following: dict[str, list[ChainedRow]] = {}
    for row in ordered:
        if row.prev_hash is not None:
            following.setdefault(row.prev_hash, []).append(row)
    present = {r.hash for r in ordered if r.hash is not None}
    problems: list[ChainProblem] = []
    chain: list[ChainedRow] = []
    visited: set[int] = set()

    def walk(start: str) -> None:
        current = start
        while True:
            candidates = [r for r in following.get(current, ()) if r.id not in visited]
            if not candidates:
                return
            # A fork (an inserted row that copies a real row's predecessor): the chain goes on
            # through the row something else follows.
            row = next((r for r in candidates if r.hash in following), candidates[0])
            chain.append(row)
            visited.add(row.id)
            if row.hash is None:
                return
            current = row.hash

    walk(GENESIS)
    while True:       # a gap: the chain resumes at the first row following a hash no row has
        resume = next(((r.id, r.prev_hash) for r in ordered if r.id not in visited and r.prev_hash is not None
                       and r.prev_hash != GENESIS and r.prev_hash not in present), None)
        if resume is None:
            break
        resume_id, missing = resume
        problems.append(ChainProblem(resume_id, ChainFault.DELETED, (
            f"row {resume_id} follows a row that is not there (hash {missing[:16]}…): a row before it "
            "was deleted, or the row before it rewritten with a new hash")))
        walk(missing)
    for row in chain:
        if not row.content_matches:
            problems.append(ChainProblem(row.id, ChainFault.EDITED,
                                         f"row {row.id} was edited: its content does not match its hash"))
    for before, after in pairwise(chain):
        if after.id < before.id:
            problems.append(ChainProblem(after.id, ChainFault.REORDERED, (
                f"row {after.id} was reordered: in the chain it follows row {before.id}, which has a later id")))
    for row in ordered:
        if row.id not in visited:
            why = "it has no hash" if row.hash is None or row.prev_hash is None else "the chain does not pass it"
            problems.append(ChainProblem(row.id, ChainFault.INSERTED,
                                         f"row {row.id} was inserted: {why}"))
    if expected_head is not None and expected_head != GENESIS and expected_head not in present:
        last_id = ordered[-1].id if ordered else 0
        problems.append(ChainProblem(last_id + 1, ChainFault.DELETED, (
            f"the row with hash {expected_head[:16]}… is not there: rows after row {last_id} were deleted")))
    problems.sort(key=lambda p: p.row_id)
    head = chain[-1].hash if chain and chain[-1].hash else GENESIS
    return ChainReport(len(ordered), head, tuple(problems))
