"""The gateway's readers: PKCS#11 slots of every loaded module and PC/SC readers, each with
the one thread that may touch it (a token driver's module thread; one thread per PC/SC reader)."""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.drivers.base import PcscDriver, PcscReaderInfo, TokenDriver, TokenInfo
from shared import cards
from shared.errors import CardIoError, NoCardPresent, ReaderNotFound, quoted
from shared.logging import get_logger

log = get_logger(__name__)

ReaderEventSink = Callable[[str, cards.Reader], None]


def token_reader(info: TokenInfo) -> cards.Reader:
    return cards.Reader(reader_id=info.reader_id, kind=cards.ReaderKind.PKCS11, name=info.slot_description.strip(),
                        card_present=info.token_present, token_label=info.token_label,
                        token_serial=info.token_serial, token_model=info.token_model, error=info.error)


def pcsc_reader(info: PcscReaderInfo) -> cards.Reader:
    return cards.Reader(reader_id=info.reader_id, kind=cards.ReaderKind.PCSC, name=info.name,
                        card_present=info.card_present, atr=info.atr)


@dataclass
class TokenSlot:
    driver: TokenDriver
    info: TokenInfo


@dataclass
class ReaderRegistry:
    token_drivers: list[TokenDriver] = field(default_factory=list)
    pcsc: PcscDriver | None = None
    _tokens: dict[str, TokenSlot] = field(default_factory=dict)
    _pcsc_readers: dict[str, PcscReaderInfo] = field(default_factory=dict)
    _pcsc_workers: dict[str, concurrent.futures.ThreadPoolExecutor] = field(default_factory=dict)
    _sinks: list[ReaderEventSink] = field(default_factory=list)

    # --- inventory ---------------------------------------------------------------------

    async def refresh(self) -> list[cards.Reader]:
        """Re-reads every module's slots and the PC/SC readers; emits events for changes."""
        await self._refresh_tokens()
        if self.pcsc is not None:
            before = {i.reader_id: pcsc_reader(i) for i in self._pcsc_readers.values()}
            infos = await asyncio.to_thread(self.pcsc.list_readers)
            self._pcsc_readers = {i.reader_id: i for i in infos}
            self._emit_changes(before, {i.reader_id: pcsc_reader(i) for i in infos})
        return self.readers()

    async def _refresh_tokens(self) -> None:
        before = {rid: token_reader(s.info) for rid, s in self._tokens.items()}
        tokens: dict[str, TokenSlot] = {}
        for driver in self.token_drivers:
            for info in await driver.thread.call_async(driver.list_tokens):
                tokens[info.reader_id] = TokenSlot(driver, info)
        self._tokens = tokens
        self._emit_changes(before, {rid: token_reader(s.info) for rid, s in tokens.items()})

    def _emit_changes(self, before: dict[str, cards.Reader], after: dict[str, cards.Reader]) -> None:
        for rid, reader in after.items():
            old = before.get(rid)
            if old is None:
                self._emit("reader_added", reader)
            elif ((old.card_present, old.token_serial, old.atr)
                  != (reader.card_present, reader.token_serial, reader.atr)):
                self._emit("inserted" if reader.card_present else "removed", reader)
            elif old.error != reader.error:
                self._emit("present", reader)           # the same reader, now (not) in error
        for rid in before.keys() - after.keys():
            self._emit("reader_removed", before[rid])

    def readers(self) -> list[cards.Reader]:
        return [token_reader(s.info) for s in self._tokens.values()] + \
               [pcsc_reader(i) for i in self._pcsc_readers.values()]

    def reader(self, reader_id: str) -> cards.Reader:
        for r in self.readers():
            if r.reader_id == reader_id:
                return r
        raise ReaderNotFound(f"no reader {quoted(reader_id)} on this gateway", reader_id=reader_id)

    def token_slot(self, reader_id: str) -> TokenSlot:
        slot = self._tokens.get(reader_id)
        if slot is None:
            raise ReaderNotFound(f"no PKCS#11 slot {quoted(reader_id)} on this gateway", reader_id=reader_id)
        if slot.info.error:
            raise CardIoError(f"token {quoted(reader_id)} cannot be used: {slot.info.error}", reader_id=reader_id)
        if not slot.info.token_present:
            raise NoCardPresent(f"no token in {quoted(reader_id)}", reader_id=reader_id)
        return slot

    def pcsc_reader_info(self, reader_id: str) -> PcscReaderInfo:
        info = self._pcsc_readers.get(reader_id)
        if info is None or self.pcsc is None:
            raise ReaderNotFound(f"no PC/SC reader {quoted(reader_id)} on this gateway", reader_id=reader_id)
        return info

    async def on_pcsc_worker(self, reader_id: str, fn, *args):
        """Runs fn on the reader's own thread: one card conversation at a time per reader."""
        pool = self._pcsc_workers.get(reader_id)
        if pool is None:
            pool = self._pcsc_workers[reader_id] = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"pcsc-{len(self._pcsc_workers)}")
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # --- events ------------------------------------------------------------------------

    def subscribe(self, sink: ReaderEventSink) -> Callable[[], None]:
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    def _emit(self, kind: str, reader: cards.Reader) -> None:
        log.info("reader event", kind=kind, reader_id=reader.reader_id, card_present=reader.card_present)
        for sink in list(self._sinks):
            sink(kind, reader)

    async def watch(self, token_poll_s: float = 2.0, pcsc_wait_s: float = 0.5) -> None:
        """Runs until cancelled: PC/SC events as pcscd reports them, tokens by polling."""
        async def pcsc_loop() -> None:
            while self.pcsc is not None:
                try:
                    events = await asyncio.to_thread(self.pcsc.wait_for_events, pcsc_wait_s)
                except Exception as exc:  # pcscd gone; keep trying, the driver reconnects
                    log.warning("pcsc events unavailable", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for ev in events:
                    if ev.kind == "reader_removed":
                        self._pcsc_readers.pop(ev.reader.reader_id, None)
                    else:
                        self._pcsc_readers[ev.reader.reader_id] = ev.reader
                    self._emit(ev.kind, pcsc_reader(ev.reader))

        async def token_loop() -> None:
            # PKCS#11 has no portable slot event that works without blocking the module's
            # only thread (C_WaitForSlotEvent), so tokens are polled.
            while True:
                await asyncio.sleep(token_poll_s)
                try:
                    await self._refresh_tokens()
                except Exception as exc:
                    log.warning("token poll failed", error=str(exc))

        await asyncio.gather(pcsc_loop(), token_loop())

    def close(self) -> None:
        for driver in self.token_drivers:
            driver.close()
        for pool in self._pcsc_workers.values():
            pool.shutdown(wait=False)
        if self.pcsc is not None:
            self.pcsc.close()
