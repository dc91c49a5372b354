"""Wrong PINs are rate-limited per card (docs/limits.md, "Wrong PINs").

A card counts wrong PINs itself and locks after a few, and a software token may never lock:
either way a gateway must not let anyone try PINs as fast as it can send them. After a
wrong PIN, the next step that presents a PIN to that card waits: it is refused with
PinAttemptsThrottled (nothing reaches the card) until `delay(failures)` has passed since the
last wrong one, a delay that doubles with every wrong PIN in a row (1 s, 2 s, 4 s, ... at most
5 minutes). A step whose PIN the card accepts ends the run. Steps that present a PIN to the
same card run one after the other, so that simultaneous guesses are throttled too.

What presents a PIN: a step on a PKCS#11 token that carries a user or SO PIN (each logs in),
and a PC/SC APDU script with a VERIFY, CHANGE REFERENCE DATA or RESET RETRY COUNTER command
carrying data. Wrong: PinIncorrect / PinLocked from the token, status word 63Cx / 6983 to
such a command from the card. The tries the card has left (PKCS#11 tells 1 only, as its
"final try" flag; 63Cx tells x) travel in `attempts_remaining` of both errors.

A card is known by its token serial, else by its reader and ATR; its PINs are counted apart
(a card counts them apart too): on a token the user PIN and the SO PIN (a step that presents
only the SO PIN, such as unblocking with the PUK), on a PC/SC card each PIN reference (P2).
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from shared import cards
from shared.errors import CardlineError, PinAttemptsThrottled, PinError, PinLocked, UnexpectedStatusWord

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 300.0
# ISO 7816-4 commands that present a PIN: VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER.
PIN_INSTRUCTIONS = frozenset({0x20, 0x24, 0x2C})
_REMEMBERED_CARDS = 10_000


def delay(failures: int) -> float:
    """How long after the last of FAILURES wrong PINs in a row the next attempt waits."""
    return 0.0 if failures <= 0 else min(FIRST_DELAY_S * 2 ** min(failures - 1, 30), MAX_DELAY_S)


@dataclass(eq=False)
class _Card:
    failures: int = 0
    last_failure: float = 0.0
    attempts_remaining: int | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def presents_pin(reader: cards.Reader, step: cards.Step) -> bool:
    if reader.kind is cards.ReaderKind.PKCS11:
        return bool(step.user_pin or step.so_pin) and not isinstance(step.operation, cards.ReadCardInfo)
    op = step.operation
    return isinstance(op, cards.RunApduScript) and any(_is_pin_command(a.command) for a in op.apdus)


def _is_pin_command(command: bytes) -> bool:
    # CLA INS P1 P2 Lc data: a PIN command with data (an empty VERIFY only asks for the tries left).
    return len(command) > 5 and command[1] in PIN_INSTRUCTIONS


def _pin_answers(apdus: Sequence[cards.Apdu], responses: Sequence[cards.ApduResponse]) -> list[int]:
    """The status words the card gave to the script's PIN commands, in order."""
    return [r.sw for a, r in zip(apdus, responses, strict=False) if _is_pin_command(a.command)]


class PinGuard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cards: OrderedDict[str, _Card] = OrderedDict()

    @staticmethod
    def pin_key(reader: cards.Reader, step: cards.Step) -> str:
        """Which card, and which of its PINs, STEP presents."""
        card = (f"serial:{reader.token_serial}" if reader.token_serial
                else f"reader:{reader.reader_id}:{reader.atr.hex()}")
        if isinstance(step.operation, cards.RunApduScript):
            reference = next(a.command[3] for a in step.operation.apdus if _is_pin_command(a.command))
            return f"{card}:pin-{reference:02X}"
        return f"{card}:{'so' if step.so_pin and not step.user_pin else 'user'}"

    def _card(self, key: str) -> _Card:
        card = self._cards.get(key)
        if card is None:
            card = self._cards[key] = _Card()
            while len(self._cards) > _REMEMBERED_CARDS:      # forget the longest unused, never one in use
                oldest_key, oldest = next(iter(self._cards.items()))
                if oldest.lock.locked():
                    break
                del self._cards[oldest_key]
        self._cards.move_to_end(key)
        return card

    async def run(self, reader: cards.Reader, step: cards.Step,
                  work: Callable[[], Awaitable[cards.StepValue]]) -> cards.StepValue:
        """WORK, unless the step presents a PIN to a card still waiting after wrong ones."""
        if not presents_pin(reader, step):
            return await work()
        card = self._card(self.pin_key(reader, step))
        async with card.lock:
            wait_s = card.last_failure + delay(card.failures) - self._clock()
            if wait_s > 0:
                raise PinAttemptsThrottled(
                    f"{card.failures} wrong PIN(s) in a row for the card in {reader.reader_id!r}: the next attempt "
                    f"is accepted in {wait_s:.1f} s", reader_id=reader.reader_id, failures=card.failures,
                    retry_after_ms=max(1, round(wait_s * 1000)), attempts_remaining=card.attempts_remaining)
            try:
                value = await work()
            except CardlineError as exc:
                self._judge(card, step, exc)
                raise
            self._judge(card, step, value)
            return value

    def _judge(self, card: _Card, step: cards.Step, outcome: cards.StepValue | CardlineError) -> None:
        """Counts a wrong PIN, or ends the run on an accepted one; anything else leaves it."""
        if isinstance(outcome, PinError):
            wrong, left = True, outcome.attempts_remaining
            if isinstance(outcome, PinLocked):
                left = 0
        elif isinstance(step.operation, cards.RunApduScript):
            responses = (outcome.responses if isinstance(outcome, (cards.ApduScriptResult, UnexpectedStatusWord))
                         else ())
            answers = _pin_answers(step.operation.apdus, responses)
            if not answers:
                return
            last = answers[-1]
            wrong = last & 0xFFF0 == 0x63C0 or last == 0x6983
            left = 0 if last == 0x6983 else (last & 0x0F if wrong else None)
        elif isinstance(outcome, CardlineError):
            return                    # failed for another reason: the PIN was not judged
        else:
            wrong, left = False, None
        if wrong:
            card.failures += 1
            card.last_failure = self._clock()
            card.attempts_remaining = left
            if isinstance(outcome, PinError) and left is not None:
                outcome.attempts_remaining = left
        else:
            card.failures, card.attempts_remaining = 0, None
