"""gateway/core/pin_guard.py: the wrong-PIN policy, with a clock the test moves (the real
gateway, token and card emulator: tests/hardware/test_pin_rate_limit.py)."""
from __future__ import annotations

import asyncio

import pytest

from gateway.core.pin_guard import MAX_DELAY_S, PinGuard, delay
from shared import cards
from shared.errors import PinAttemptsThrottled, PinIncorrect, UnexpectedStatusWord

TOKEN = cards.Reader("pkcs11:softhsm2:1", cards.ReaderKind.PKCS11, "slot 1", True, token_serial="abc")
PCSC = cards.Reader("pcsc:Virtual PCD 00 00", cards.ReaderKind.PCSC, "Virtual PCD", True, atr=b"\x3b\x88")
LIST = cards.Step(cards.ListObjects(), user_pin="0000")
WRONG_VERIFY = cards.Apdu(bytes.fromhex("0020008106") + b"999999")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wrong_pin():
    raise PinIncorrect("refused")


async def attempt(guard: PinGuard, reader=TOKEN, step=LIST, work=None):
    ran = []

    async def run():
        ran.append(1)
        if work is None:
            wrong_pin()
        return work()
    try:
        return await guard.run(reader, step, run), bool(ran)
    except (PinIncorrect, PinAttemptsThrottled, UnexpectedStatusWord) as exc:
        return exc, bool(ran)


def test_pin_guard_delay_doubles_from_one_second_up_to_five_minutes():
    assert [delay(n) for n in range(5)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert delay(100) == MAX_DELAY_S == 300.0


def test_pin_guard_throttles_the_next_attempt_after_a_wrong_pin_until_the_delay_passed():
    clock = Clock()
    guard = PinGuard(clock)

    async def body():
        first = await attempt(guard)
        second = await attempt(guard)
        clock.now += 1.0
        third = await attempt(guard)
        clock.now += 1.5
        fourth = await attempt(guard)
        clock.now += 0.6
        right = await attempt(guard, work=lambda: cards.ObjectListing(()))
        after = await attempt(guard)
        return first, second, third, fourth, right, after

    first, second, third, fourth, right, after = asyncio.run(body())
    assert isinstance(first[0], PinIncorrect) and first[1]
    assert isinstance(second[0], PinAttemptsThrottled) and not second[1]        # never reached the token
    assert second[0].retry_after_ms == 1000 and second[0].failures == 1
    assert isinstance(third[0], PinIncorrect) and third[1]
    assert isinstance(fourth[0], PinAttemptsThrottled) and fourth[0].retry_after_ms == 500
    assert right == (cards.ObjectListing(()), True)                             # the right PIN ends the run
    assert isinstance(after[0], PinIncorrect)


def test_pin_guard_simultaneous_guesses_reach_the_card_once():
    guard = PinGuard(Clock())

    async def body():
        return await asyncio.gather(*(attempt(guard) for _ in range(30)))

    results = asyncio.run(body())
    assert sum(ran for _, ran in results) == 1
    assert sum(isinstance(e, PinAttemptsThrottled) for e, _ in results) == 29


def test_pin_guard_counts_the_so_pin_apart_and_leaves_steps_without_a_pin_alone():
    guard = PinGuard(Clock())
    unblock = cards.Step(cards.SetPins(new_user_pin="1111"), so_pin="12345678")

    async def body():
        await attempt(guard)
        so = await attempt(guard, step=unblock, work=lambda: cards.PinsSet())
        info = await attempt(guard, step=cards.Step(cards.ReadCardInfo()), work=lambda: TOKEN)
        return so, info

    so, info = asyncio.run(body())
    assert so == (cards.PinsSet(), True) and info == (TOKEN, True)


def test_pin_guard_reads_63cx_answers_to_verify_with_the_tries_left():
    guard = PinGuard(Clock())
    script = cards.Step(cards.RunApduScript((cards.Apdu(bytes.fromhex("00A4040000")), WRONG_VERIFY)))

    def card_says_two_left():
        raise UnexpectedStatusWord("63C2", index=1, sw=0x63C2, responses=(cards.ApduResponse(b"", 0x9000),
                                                                          cards.ApduResponse(b"", 0x63C2)))

    async def body():
        first = await attempt(guard, PCSC, script, card_says_two_left)
        second = await attempt(guard, PCSC, script, card_says_two_left)
        empty_verify = cards.Step(cards.RunApduScript((cards.Apdu(bytes.fromhex("0020008100"), ("63CX",)),)))
        tries_left = cards.ApduScriptResult((cards.ApduResponse(b"", 0x63C2),))
        ask = await attempt(guard, PCSC, empty_verify, lambda: tries_left)
        return first, second, ask

    first, second, ask = asyncio.run(body())
    assert isinstance(first[0], UnexpectedStatusWord) and first[1]
    assert isinstance(second[0], PinAttemptsThrottled) and second[0].attempts_remaining == 2 and not second[1]
    assert ask[1]                     # a VERIFY without data only asks for the tries left: not throttled


@pytest.mark.parametrize("sw, left", [(0x63C1, 1), (0x6983, 0)])
def test_pin_guard_reports_the_tries_left_a_card_tells(sw, left):
    guard = PinGuard(Clock())
    script = cards.Step(cards.RunApduScript((WRONG_VERIFY,)))

    async def body():
        await attempt(guard, PCSC, script, lambda: cards.ApduScriptResult((cards.ApduResponse(b"", sw),)))
        return await attempt(guard, PCSC, script)

    throttled, ran = asyncio.run(body())
    assert isinstance(throttled, PinAttemptsThrottled) and throttled.attempts_remaining == left and not ran
