"""The reader pool: every reader of every attached gateway, leases, and the way to run a
step on a reader through its gateway's link."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shared import cards
from shared.errors import (CardlineError, GatewayNotConnected, NoCardPresent, ReaderBusy, ReaderNotFound,
                           StepTimeout)
from shared.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Command:
    command_id: str
    reader_id: str
    task_id: str
    step_number: int
    step: cards.Step


@dataclass(frozen=True)
class ReaderSelector:
    """Picks readers from the pool; empty fields match anything."""
    gateway_id: str = ""
    reader_id: str = ""
    kind: cards.ReaderKind | None = None
    site: str = ""
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    def matches(self, session: "GatewaySession", reader: cards.Reader) -> bool:
        return ((not self.gateway_id or self.gateway_id == session.gateway_id)
                and (not self.reader_id or self.reader_id == reader.reader_id)
                and (self.kind is None or self.kind is reader.kind)
                and (not self.site or self.site == session.site)
                and all(session.labels.get(k) == v for k, v in self.labels.items()))


@dataclass(frozen=True)
class PooledReader:
    gateway_id: str
    reader: cards.Reader
    busy: bool


_CLOSED = object()


@dataclass(eq=False)
class GatewaySession:
    """One attached gateway: its readers and the commands in flight on its stream."""
    gateway_id: str
    site: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    readers: dict[str, cards.Reader] = field(default_factory=dict)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    _pending: dict[str, asyncio.Future] = field(default_factory=dict)
    closed: bool = False

    async def run_step(self, reader_id: str, step: cards.Step, *, task_id: str, step_number: int,
                       timeout_s: float) -> cards.StepValue:
        if self.closed:
            raise GatewayNotConnected(f"gateway {self.gateway_id!r} is not attached", gateway_id=self.gateway_id)
        command = Command(uuid.uuid4().hex, reader_id, task_id, step_number, step)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[command.command_id] = future
        self.outbox.put_nowait(command)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise StepTimeout(f"gateway {self.gateway_id!r} did not answer step {step_number} within {timeout_s:g} s",
                              gateway_id=self.gateway_id, step=str(step_number)) from None
        finally:
            self._pending.pop(command.command_id, None)

    def resolve(self, command_id: str, result: cards.StepValue | CardlineError) -> None:
        future = self._pending.get(command_id)
        if future is None or future.done():
            log.warning("step result for no pending command", gateway_id=self.gateway_id, command_id=command_id)
            return
        if isinstance(result, CardlineError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def close(self) -> None:
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GatewayNotConnected(
                    f"gateway {self.gateway_id!r} went away during the step", gateway_id=self.gateway_id))
        self.outbox.put_nowait(_CLOSED)

    @staticmethod
    def is_close_marker(item: object) -> bool:
        return item is _CLOSED


class ReaderPool:
    def __init__(self) -> None:
        self._sessions: dict[str, GatewaySession] = {}
        self._busy: set[tuple[str, str]] = set()

    # --- gateways ----------------------------------------------------------------------

    def attach(self, session: GatewaySession) -> None:
        old = self._sessions.get(session.gateway_id)
        if old is not None:
            log.info("gateway reattached, closing its previous stream", gateway_id=session.gateway_id)
            old.close()
        self._sessions[session.gateway_id] = session
        log.info("gateway attached", gateway_id=session.gateway_id, readers=len(session.readers))

    def detach(self, session: GatewaySession) -> None:
        session.close()
        if self._sessions.get(session.gateway_id) is session:
            del self._sessions[session.gateway_id]
            log.info("gateway detached", gateway_id=session.gateway_id)

    def reader_event(self, session: GatewaySession, kind: str, reader: cards.Reader) -> None:
        if kind == "reader_removed":
            session.readers.pop(reader.reader_id, None)
        else:
            session.readers[reader.reader_id] = reader

    def session(self, gateway_id: str) -> GatewaySession:
        session = self._sessions.get(gateway_id)
        if session is None:
            raise GatewayNotConnected(f"gateway {gateway_id!r} is not attached", gateway_id=gateway_id)
        return session

    # --- readers -----------------------------------------------------------------------

    def list(self, selector: ReaderSelector = ReaderSelector()) -> list[PooledReader]:
        return [PooledReader(gid, r, (gid, r.reader_id) in self._busy)
                for gid, s in sorted(self._sessions.items()) for r in s.readers.values()
                if selector.matches(s, r)]

    @contextlib.asynccontextmanager
    async def lease(self, selector: ReaderSelector, *, need_card: bool = True) -> AsyncIterator["Lease"]:
        """Holds a matching reader for the caller until the block ends."""
        candidates = self.list(selector)
        if not candidates:
            if selector.gateway_id and selector.gateway_id not in self._sessions:
                raise GatewayNotConnected(f"gateway {selector.gateway_id!r} is not attached",
                                          gateway_id=selector.gateway_id)
            raise ReaderNotFound(f"no reader matches {selector}", reader_id=selector.reader_id)
        free = [c for c in candidates if not c.busy]
        if not free:
            raise ReaderBusy(f"every reader matching {selector} is busy")
        ready = [c for c in free if c.reader.card_present or not need_card]
        if not ready:
            raise NoCardPresent(f"no card in any free reader matching {selector}", reader_id=free[0].reader.reader_id)
        chosen = ready[0]
        key = (chosen.gateway_id, chosen.reader.reader_id)
        self._busy.add(key)
        try:
            yield Lease(self.session(chosen.gateway_id), chosen.reader)
        finally:
            self._busy.discard(key)


@dataclass(frozen=True)
class Lease:
    session: GatewaySession
    reader: cards.Reader

    @property
    def gateway_id(self) -> str:
        return self.session.gateway_id

    async def run(self, step: cards.Step, *, task_id: str, step_number: int, timeout_s: float) -> cards.StepValue:
        return await self.session.run_step(self.reader.reader_id, step, task_id=task_id, step_number=step_number,
                                           timeout_s=timeout_s)
