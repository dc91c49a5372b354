"""PC/SC card driver on pyscard's low-level ``smartcard.scard`` API (pcsc-lite / WinSCard).

Behaviour (see ``PcscDriver`` in gateway/drivers/base.py):

* ``reader_id`` is ``"pcsc:" + reader name``; ``run_script`` accepts either form.
* ``run_script`` validates every command APDU (ISO 7816-4 cases 1, 2, 3, 4, short and
  extended, Lc consistent with the data) and every expected-SW pattern before anything is
  sent, then connects (exclusive, falling back to shared when another application holds the
  card; T=0 or T=1), wraps the whole script in a PC/SC transaction and sends the APDUs in
  order. 61xx is followed by GET RESPONSE (00 C0 00 00 xx), the data accumulated; 6Cxx
  makes it resend the same command with Le=xx. Neither happens when the APDU explicitly
  expects it (a pattern starting with "61" or "6C"): the script then gets the raw answer.
  The final SW must match one of ``expected_sw`` (4 hex digits, "X" = any digit; an empty
  tuple accepts anything), otherwise ``UnexpectedStatusWord`` (with ``index``, ``sw``) stops
  the script; its ``responses`` hold the answers so far, the failing one included, and
  travel with it over the gateway link.
* The card is left as is at the end of a script (SCARD_LEAVE_CARD), so state such as a
  verified PIN survives into the next script; pass ``disposition=SCARD_RESET_CARD`` to the
  constructor to reset it after every script instead.
* ``wait_for_events`` watches every reader plus the ``\\\\?PnP?\\Notification`` pseudo-reader
  and reports what changed since the previous call; the first call reports what is already
  there (reader_added for each reader, inserted for each card).
* pcscd restarts: a context of a dead pcscd fails for good (SCARD_E_NO_SERVICE ...). Every
  call that fails that way re-establishes its context and is retried once. A script is only
  retried when the failure came before its first APDU was sent, never in the middle
  (APDUs are not idempotent): pcscd dying mid-script is a CardIoError, and the next call
  works again.

Threads: one PC/SC context per thread (pcsc-lite serialises calls on one context and
pyscard releases the GIL during them), so ``run_script`` may run concurrently on different
readers from different threads. ``wait_for_events`` keeps state of its own and must be
called from one thread at a time. ``close`` releases every context; call it last.
"""
from __future__ import annotations

import re
import threading
import time

from smartcard import scard

from gateway.drivers.base import Apdu, ApduResponse, PcscEvent, PcscReaderInfo
from shared.cards import check_command_apdu
from shared.errors import (
    CardIoError,
    CardRemoved,
    InvalidArgument,
    MalformedApdu,
    NoCardPresent,
    ReaderBusy,
    ReaderNotFound,
    UnexpectedStatusWord,
)

READER_PREFIX = "pcsc:"
PNP_READER = "\\\\?PnP?\\Notification"

# The context (or pcscd behind it) is gone: re-establish and retry once.
_DEAD_CONTEXT = {
    scard.SCARD_E_NO_SERVICE,
    scard.SCARD_E_SERVICE_STOPPED,
    scard.SCARD_E_INVALID_HANDLE,
}
_NO_CARD = {scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_REMOVED_CARD}
_UNKNOWN_READER = {scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE}
_MAX_RESPONSE_ROUNDS = 512          # GET RESPONSE rounds before we call the card broken
_REMOVAL_GRACE_S = 1.0              # vpcd/pcscd see a pulled card within ~0.3-0.4 s
_SW_PATTERN = re.compile(r"^[0-9A-FX]{4}$")


def reader_id(name: str) -> str:
    return READER_PREFIX + name


def _reader_name(reader: str) -> str:
    return reader[len(READER_PREFIX):] if reader.startswith(READER_PREFIX) else reader


def _err(hresult: int) -> str:
    return f"{scard.SCardGetErrorMessage(hresult)} (0x{hresult & 0xFFFFFFFF:08X})"


# -- APDU structure --------------------------------------------------------------------

def _with_le(apdu: bytes, le: int) -> bytes:
    """The same command with its Le replaced by ``le`` (the 6Cxx resend)."""
    header, body = apdu[:4], apdu[4:]
    extended = len(body) >= 3 and body[0] == 0
    if not extended:
        data = b"" if len(body) <= 1 else body[:1 + body[0]]
        return header + data + bytes([le & 0xFF])
    if len(body) == 3:                                      # case 2E
        return header + bytes([0, le >> 8 & 0xFF, le & 0xFF])
    lc = body[1] << 8 | body[2]
    return header + body[:3 + lc] + bytes([le >> 8 & 0xFF, le & 0xFF])


def sw_matches(sw: int, pattern: str) -> bool:
    text = f"{sw:04X}"
    return all(p in ("X", c) for p, c in zip(pattern.upper(), text, strict=False))


# -- the driver ------------------------------------------------------------------------

class PyscardDriver:
    def __init__(self, *, exclusive: bool = True,
                 disposition: int = scard.SCARD_LEAVE_CARD) -> None:
        self._exclusive = exclusive
        self._disposition = disposition
        self._local = threading.local()      # .context: this thread's PC/SC context
        self._contexts: set[int] = set()     # every context we made, to release on close
        self._lock = threading.Lock()
        self._event_context: int | None = None
        self._known: dict[str, tuple[int, bytes]] | None = None   # name -> (state, atr)
        self._pnp_state = scard.SCARD_STATE_UNAWARE
        self._closed = False

    # -- contexts ------------------------------------------------------------------------
    def _establish(self) -> int:
        hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hresult != scard.SCARD_S_SUCCESS:
            raise CardIoError(f"cannot reach pcscd: {_err(hresult)}")
        with self._lock:
            self._contexts.add(context)
        return context

    def _release(self, context: int) -> None:
        with self._lock:
            self._contexts.discard(context)
        scard.SCardReleaseContext(context)   # fails harmlessly on a dead context

    def _context(self, renew: bool = False) -> int:
        if self._closed:
            raise CardIoError("driver is closed")
        context = getattr(self._local, "context", None)
        if renew and context is not None:
            self._release(context)
            context = None
        if context is None:
            context = self._local.context = self._establish()
        return context

    def _with_context(self, call):
        """call(context) -> hresult-first tuple; renews a dead context and retries once."""
        result = call(self._context())
        if result[0] in _DEAD_CONTEXT:
            result = call(self._context(renew=True))
        return result

    # -- readers -------------------------------------------------------------------------
    def _reader_names(self, call=None) -> list[str]:
        hresult, names = (call or self._with_context)(lambda c: scard.SCardListReaders(c, []))
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult != scard.SCARD_S_SUCCESS:
            raise CardIoError(f"cannot list readers: {_err(hresult)}")
        return list(names)

    def list_readers(self) -> list[PcscReaderInfo]:
        names = self._reader_names()
        if not names:
            return []
        hresult, states = self._with_context(lambda c: scard.SCardGetStatusChange(
            c, 0, [(n, scard.SCARD_STATE_UNAWARE) for n in names]))
        if hresult != scard.SCARD_S_SUCCESS:
            raise CardIoError(f"cannot read reader states: {_err(hresult)}")
        return [_info(name, state, atr) for name, state, atr in states
                if not state & scard.SCARD_STATE_UNKNOWN]

    # -- scripts -------------------------------------------------------------------------
    def run_script(self, reader_name: str, apdus: list[Apdu]) -> list[ApduResponse]:
        name = _reader_name(reader_name)
        for index, apdu in enumerate(apdus):
            problem = check_command_apdu(bytes(apdu.command))
            if problem:
                raise MalformedApdu(f"APDU {index}: {problem}", index=index,
                                    apdu=bytes(apdu.command).hex().upper())
            for pattern in apdu.expected_sw:
                if not _SW_PATTERN.match(pattern.upper()):
                    raise InvalidArgument(
                        f"APDU {index}: expected SW {pattern!r} is not 4 hex digits or X",
                        index=index)

        hcard, protocol = self._connect(name)
        try:
            hresult = scard.SCardBeginTransaction(hcard)
            if hresult != scard.SCARD_S_SUCCESS:
                raise self._card_error(name, hresult, "begin transaction")
            try:
                return self._run(name, hcard, protocol, apdus)
            finally:
                scard.SCardEndTransaction(hcard, scard.SCARD_LEAVE_CARD)
        finally:
            scard.SCardDisconnect(hcard, self._disposition)

    def _connect(self, name: str) -> tuple[int, int]:
        protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1

        def connect(context: int, mode: int):
            return scard.SCardConnect(context, name, mode, protocols)

        first = scard.SCARD_SHARE_EXCLUSIVE if self._exclusive else scard.SCARD_SHARE_SHARED
        hresult, hcard, protocol = self._with_context(lambda c: connect(c, first))
        if hresult == scard.SCARD_E_SHARING_VIOLATION and first == scard.SCARD_SHARE_EXCLUSIVE:
            # Someone else (scdaemon, a browser...) has the card open: share it; the
            # transaction still keeps them out for the length of the script.
            hresult, hcard, protocol = self._with_context(
                lambda c: connect(c, scard.SCARD_SHARE_SHARED))
        if hresult == scard.SCARD_S_SUCCESS:
            return hcard, protocol
        if hresult in _UNKNOWN_READER:
            raise ReaderNotFound(f"no reader {name!r}", reader_id=reader_id(name))
        if hresult in _NO_CARD:
            raise NoCardPresent(f"no card in {name!r}", reader_id=reader_id(name))
        if hresult == scard.SCARD_E_SHARING_VIOLATION:
            raise ReaderBusy(f"another application holds {name!r} exclusively",
                             reader_id=reader_id(name))
        raise CardIoError(f"cannot connect to {name!r}: {_err(hresult)}",
                          reader_id=reader_id(name))

    def _run(self, name: str, hcard: int, protocol: int,
             apdus: list[Apdu]) -> list[ApduResponse]:
        responses: list[ApduResponse] = []
        for index, apdu in enumerate(apdus):
            response = self._exchange(name, hcard, protocol, bytes(apdu.command),
                                      apdu.expected_sw, index)
            responses.append(response)
            if apdu.expected_sw and not any(sw_matches(response.sw, p)
                                            for p in apdu.expected_sw):
                raise UnexpectedStatusWord(
                    f"APDU {index} answered {response.sw:04X}, expected "
                    f"{' or '.join(apdu.expected_sw)}", index=index, sw=response.sw, responses=responses)
        return responses

    def _exchange(self, name: str, hcard: int, protocol: int, command: bytes,
                  expected: tuple[str, ...], index: int) -> ApduResponse:
        """One APDU with its 61xx / 6Cxx follow-ups."""
        raw_61 = any(p.upper().startswith("61") for p in expected)
        raw_6c = any(p.upper().startswith("6C") for p in expected)
        data = b""
        resent = False
        for _ in range(_MAX_RESPONSE_ROUNDS):
            answer = self._transmit(name, hcard, protocol, command, index)
            sw1, sw2 = answer[-2], answer[-1]
            if sw1 == 0x6C and not resent and not raw_6c:
                command, resent = _with_le(command, sw2), True
                continue
            data += answer[:-2]
            if sw1 == 0x61 and not raw_61:
                command, resent = bytes([0x00, 0xC0, 0x00, 0x00, sw2]), False
                continue
            return ApduResponse(data=data, sw=sw1 << 8 | sw2)
        raise CardIoError(f"APDU {index}: card kept answering 61xx", index=index,
                          reader_id=reader_id(name))

    def _transmit(self, name: str, hcard: int, protocol: int, command: bytes,
                  index: int) -> bytes:
        hresult, answer = scard.SCardTransmit(hcard, protocol, list(command))
        if hresult == scard.SCARD_S_SUCCESS and len(answer) >= 2:
            return bytes(answer)
        # vpcd answers "success, 0 bytes" when the card vanished mid-APDU.
        raise self._card_error(name, hresult, f"APDU {index}", index=index)

    def _card_error(self, name: str, hresult: int, what: str, **meta):
        """Classify a failure while talking to the card: pulled card or other I/O error."""
        rid = reader_id(name)
        if hresult in _DEAD_CONTEXT:
            # pcscd went away mid-script; renew so the next call works, but do not replay
            # APDUs that may already have had an effect.
            self._context(renew=True)
            return CardIoError(f"{what}: pcscd went away: {_err(hresult)}", reader_id=rid, **meta)
        if hresult in _NO_CARD or self._card_gone(name):
            return CardRemoved(f"{what}: card removed from {name!r}", reader_id=rid, **meta)
        detail = _err(hresult) if hresult else "empty answer"
        return CardIoError(f"{what} on {name!r} failed: {detail}", reader_id=rid, **meta)

    def _card_gone(self, name: str) -> bool:
        """Wait briefly for pcscd to notice a pulled card (it polls the reader)."""
        try:
            context = self._context()
        except CardIoError:
            return False
        deadline = time.monotonic() + _REMOVAL_GRACE_S
        state = scard.SCARD_STATE_UNAWARE
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            hresult, states = scard.SCardGetStatusChange(
                context, max(remaining, 0), [(name, state)])
            if hresult != scard.SCARD_S_SUCCESS:
                return hresult in _UNKNOWN_READER     # the reader itself went away
            state = states[0][1]
            if state & (scard.SCARD_STATE_EMPTY | scard.SCARD_STATE_UNAVAILABLE
                        | scard.SCARD_STATE_UNKNOWN):
                return True
            if remaining <= 0:
                return False
            state &= ~scard.SCARD_STATE_CHANGED

    # -- events --------------------------------------------------------------------------
    def _event_call(self, call):
        """Like _with_context, on the context reserved for wait_for_events."""
        if self._closed:
            raise CardIoError("driver is closed")
        if self._event_context is None:
            self._event_context = self._establish()
        result = call(self._event_context)
        if result[0] in _DEAD_CONTEXT:
            self._release(self._event_context)
            self._event_context = None
            self._pnp_state = scard.SCARD_STATE_UNAWARE
            self._event_context = self._establish()
            result = call(self._event_context)
        return result

    def _snapshot(self, timeout_ms: int) -> dict[str, tuple[int, bytes]] | None:
        """Reader states once something changed (or now, for timeout 0); None on timeout."""
        names = self._reader_names(self._event_call)
        known = self._known or {}
        watch = [(n, known.get(n, (scard.SCARD_STATE_UNAWARE, b""))[0]) for n in names]
        watch.append((PNP_READER, self._pnp_state))
        hresult, states = self._event_call(
            lambda c: scard.SCardGetStatusChange(c, timeout_ms, watch))
        if hresult == scard.SCARD_E_TIMEOUT:
            return None
        if hresult in _UNKNOWN_READER:
            # A reader went away between listing and watching: look again right away.
            hresult, states = self._event_call(lambda c: scard.SCardGetStatusChange(
                c, 0, [(n, scard.SCARD_STATE_UNAWARE) for n in self._reader_names(
                    self._event_call)] + [(PNP_READER, self._pnp_state)]))
        if hresult not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_TIMEOUT):
            raise CardIoError(f"cannot watch readers: {_err(hresult)}")
        snapshot = {}
        for name, state, atr in states:
            if name == PNP_READER:
                self._pnp_state = state & ~scard.SCARD_STATE_CHANGED
            elif not state & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE):
                snapshot[name] = (state & ~scard.SCARD_STATE_CHANGED, bytes(atr))
        return snapshot

    def wait_for_events(self, timeout_s: float) -> list[PcscEvent]:
        deadline = time.monotonic() + max(timeout_s, 0)
        timeout_ms = 0
        while True:
            snapshot = self._snapshot(timeout_ms)
            if snapshot is not None:
                events = _diff(self._known or {}, snapshot)
                self._known = snapshot
                if events:
                    return events
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # States that change without an event (INUSE when we connect) wake us up too:
            # keep waiting for the rest of the time.
            timeout_ms = max(1, int(remaining * 1000))

    # -- end -----------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        with self._lock:
            contexts, self._contexts = list(self._contexts), set()
        for context in contexts:
            scard.SCardReleaseContext(context)
        self._event_context = None
        self._local = threading.local()


def _present(state: int) -> bool:
    return bool(state & scard.SCARD_STATE_PRESENT)


def _info(name: str, state: int, atr) -> PcscReaderInfo:
    present = _present(state)
    return PcscReaderInfo(reader_id=reader_id(name), name=name, card_present=present,
                          atr=bytes(atr) if present else b"")


def _diff(old: dict[str, tuple[int, bytes]],
          new: dict[str, tuple[int, bytes]]) -> list[PcscEvent]:
    """Events turning ``old`` into ``new``. pcsc-lite counts card insertions and removals in
    the high 16 bits of the state, so a card swapped between two calls shows up too."""
    events: list[PcscEvent] = []
    for name in old.keys() - new.keys():
        state, atr = old[name]
        if _present(state):
            events.append(PcscEvent("removed", _info(name, 0, b"")))
        events.append(PcscEvent("reader_removed", _info(name, 0, b"")))
    for name, (state, atr) in new.items():
        info = _info(name, state, atr)
        if name not in old:
            events.append(PcscEvent("reader_added", info))
            if _present(state):
                events.append(PcscEvent("inserted", info))
            continue
        old_state = old[name][0]
        was, now = _present(old_state), _present(state)
        swapped = was and now and (old_state >> 16) != (state >> 16)
        if was and (not now or swapped):
            events.append(PcscEvent("removed", _info(name, 0, b"")))
        if now and (not was or swapped):
            events.append(PcscEvent("inserted", info))
    return events
