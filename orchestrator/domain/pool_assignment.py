"""Who gets which reader: the queue of the reader pool served in order, as a pure function.

Used by the in-memory pool of one orchestrator (orchestrator/services/pool.py) and by the pool
federated over PostgreSQL (orchestrator/services/pool_federated.py), which runs it in one
transaction on rows every replica wrote. No I/O, no clock: the caller passes what it knows.

The rule (docs/pool.md): waiters are served in queue order; each gets the free, ready reader
that matches it and was used least recently (ties: gateway id, reader id), so work spreads over
every reader; a later waiter only goes first when no reader it could take suits those before
it. A waiter no connected reader matches any more is hopeless (it fails). The others keep
their order and are numbered 1, 2, ... (their positions).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared import cards

ReaderKey = tuple[str, str]             # (gateway id, reader id)


def has_card(reader: cards.Reader) -> bool:
    """Holds a card that can be worked on (an uninitialised PKCS#11 token has no serial)."""
    return reader.card_present and (reader.kind is not cards.ReaderKind.PKCS11 or bool(reader.token_serial))


def card_key(reader: cards.Reader) -> str:
    """Which card a reader holds: its token serial, else its ATR (hex)."""
    return reader.token_serial or reader.atr.hex()


class Place(Protocol):
    """Where readers stand: a gateway's id, site and labels."""
    @property
    def gateway_id(self) -> str: ...
    @property
    def site(self) -> str: ...
    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class ReaderSelector:
    """Picks readers from the pool; empty fields match anything. `labels` must all match the
    gateway's labels; `card_present` asks for readers holding a card."""
    gateway_id: str = ""
    reader_id: str = ""
    kind: cards.ReaderKind | None = None
    site: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    card_present: bool = False
    # Hashed once: every serve groups its waiters by selector (and an enum's hash is Python code).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.gateway_id, self.reader_id, self.kind, self.site,
                                                self.card_present)))

    def __hash__(self) -> int:
        return self._hash

    def matches_place(self, gateway_id: str, site: str, labels: Mapping[str, str], reader: cards.Reader) -> bool:
        """Everything but the card."""
        return ((not self.gateway_id or self.gateway_id == gateway_id)
                and (not self.reader_id or self.reader_id == reader.reader_id)
                and (self.kind is None or self.kind is reader.kind)
                and (not self.site or self.site == site)
                and all(labels.get(k) == v for k, v in self.labels.items()))

    def matches(self, place: Place, reader: cards.Reader) -> bool:
        return (self.matches_place(place.gateway_id, place.site, place.labels, reader)
                and (not self.card_present or has_card(reader)))

    def matches_pooled(self, p: Any) -> bool:     # a PooledReader (orchestrator/services/pool.py)
        return (self.matches_place(p.gateway_id, p.site, p.labels, p.reader)
                and (not self.card_present or has_card(p.reader)))

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("gateway", self.gateway_id), ("reader", self.reader_id),
                                          ("kind", self.kind.value if self.kind else ""), ("site", self.site)) if v]
        parts += [f"label {k}={v}" for k, v in sorted(self.labels.items())]
        if self.card_present:
            parts.append("card present")
        return "{" + ", ".join(parts) + "}" if parts else "{any reader}"

    def to_data(self) -> dict[str, Any]:
        """As JSON-able data (a waiter's row)."""
        return {"gateway_id": self.gateway_id, "reader_id": self.reader_id,
                "kind": self.kind.value if self.kind else "", "site": self.site, "labels": dict(self.labels),
                "card_present": self.card_present}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ReaderSelector:
        return cls(gateway_id=data.get("gateway_id", ""), reader_id=data.get("reader_id", ""),
                   kind=cards.ReaderKind(data["kind"]) if data.get("kind") else None, site=data.get("site", ""),
                   labels=dict(data.get("labels") or {}), card_present=bool(data.get("card_present")))


ANY_READER = ReaderSelector()


@dataclass(frozen=True)
class Candidate:
    """A reader of a connected gateway."""
    gateway_id: str
    site: str
    labels: Mapping[str, str]
    reader: cards.Reader
    key: ReaderKey = field(init=False, repr=False, compare=False)     # made once: a serve asks often

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.gateway_id, self.reader.reader_id))


@dataclass(frozen=True)
class Want:
    """A waiter, as the assignment sees it. `accepts(gateway_id, reader)` false leaves that
    reader's card to others (None: any card)."""
    waiter: object                           # the caller's handle (a _Waiter, a row id)
    selector: ReaderSelector
    need_card: bool
    scope: ReaderSelector | None = None      # a second selector the reader must also match
    accepts: Callable[[str, cards.Reader], bool] | None = None
    # Made once, what `assign` groups waiters by: the readers they match (place), and the
    # readers they would take (alike).
    place: tuple[object, ...] = field(init=False, repr=False, compare=False)
    alike: tuple[object, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "place", (self.selector, self.scope))
        object.__setattr__(self, "alike", (self.selector, self.scope, self.need_card, self.accepts))

    def wants(self, c: Candidate) -> bool:
        """Matches the reader, card aside."""
        return (self.selector.matches_place(c.gateway_id, c.site, c.labels, c.reader)
                and (self.scope is None or self.scope.matches_place(c.gateway_id, c.site, c.labels, c.reader)))


@dataclass
class Assignment:
    granted: list[tuple[Want, Candidate]] = field(default_factory=list)   # in queue order
    hopeless: list[Want] = field(default_factory=list)                    # nothing matches any more
    positions: list[tuple[Want, int]] = field(default_factory=list)       # the rest, numbered from 1


def assign(queue: Sequence[Want], candidates: Sequence[Candidate], held: Callable[[ReaderKey], bool],
           last_used: Callable[[ReaderKey], float],
           matching_of: dict[tuple[object, ...], list[Candidate]] | None = None) -> Assignment:
    """Serves QUEUE (in order) from CANDIDATES (the readers of connected gateways); HELD(key)
    says a reader is taken, LAST_USED(key) when it was last given back (0: never).
    MATCHING_OF, when given, keeps the readers each kind of request matches from one call to
    the next: the caller empties it whenever CANDIDATES change."""
    out = Assignment()
    taken_now: set[ReaderKey] = set()
    waiting: list[Want] = []
    # Waiters asking alike (an order's cards: one selector, one scope, one accepts) share
    # their matching readers, and once one of them finds none free in this round, so do the
    # ones behind it (readers are only taken within a round): a serve costs a pass over the
    # readers per kind of request and per grant, not per waiter.
    if matching_of is None:
        matching_of = {}
    exhausted: set[tuple[object, ...]] = set()
    for want in queue:
        matching = matching_of.get(want.place)
        if matching is None:
            matching = matching_of[want.place] = [c for c in candidates if want.wants(c)]
        if not matching:
            out.hopeless.append(want)
            continue
        alike = want.alike
        if alike in exhausted:
            waiting.append(want)
            continue
        free = [c for c in matching if c.key not in taken_now and not held(c.key)
                and (has_card(c.reader) or not want.need_card)
                and (want.accepts is None or want.accepts(c.gateway_id, c.reader))]
        if not free:
            exhausted.add(alike)
            waiting.append(want)
            continue
        chosen = min(free, key=lambda c: (last_used(c.key), c.gateway_id, c.reader.reader_id))
        taken_now.add(chosen.key)
        out.granted.append((want, chosen))
    out.positions = [(want, position) for position, want in enumerate(waiting, start=1)]
    return out
