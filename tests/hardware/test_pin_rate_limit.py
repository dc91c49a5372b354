"""Wrong PINs through a real gateway are rate-limited per card (gateway/core/pin_guard.py,
docs/limits.md "Wrong PINs"): 30 wrong PINs sent at once to a SoftHSM2 token or to the card
emulator behind pcscd + vpcd reach the card once; the rest are refused with PIN_THROTTLED,
the delay to wait and the tries the card has left."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway import app as gateway_app
from shared import config
from shared.errors import PinAttemptsThrottled, PinIncorrect, UnexpectedStatusWord
from shared.proto import gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.rpc import error_from_rpc
from tests.support.pki import default_pki
from tests.support.vpcd_card import APP_AID, PIN_TRIES

pytestmark = pytest.mark.hardware
GUESSES = 30
SELECT = bytes.fromhex("00A40400") + bytes([len(APP_AID)]) + APP_AID
WRONG_VERIFY = bytes.fromhex("0020008106") + b"999999"


async def with_gateway(body, **settings):
    pki = default_pki()
    pki.gateway("pin-station")
    gw = await gateway_app.start(config.load(config.GatewaySettings, listen="127.0.0.1:0", gateway_id="pin-station",
                                             **pki.settings(), **settings))
    try:
        async with pki.aio_channel(gw.address) as channel:
            return await body(gateway_pb2_grpc.GatewayServiceStub(channel))
    finally:
        await gw.stop()


async def outcome(call):
    """The error a RunStep ended with (rebuilt from its status), or its response."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return error_from_rpc(exc)


def test_pin_30_wrong_pins_at_once_reach_a_softhsm2_token_once_then_wait_a_doubling_delay(softhsm_token):
    async def body(stub):
        readers = (await stub.ListReaders(gateway_pb2.ListReadersRequest())).readers
        reader_id = next(r.reader_id for r in readers if r.token_serial == softhsm_token.serial)

        def listing(pin: str):
            return stub.RunStep(gateway_pb2.RunStepRequest(reader_id=reader_id, step=steps_pb2.Step(
                list_objects=steps_pb2.ListObjects(), credentials=steps_pb2.Credentials(user_pin=pin))))

        started = time.monotonic()
        burst = await asyncio.gather(*(outcome(listing(f"{i:04d}9")) for i in range(GUESSES)))
        burst_s = time.monotonic() - started
        wait_s = max(e.retry_after_ms or 0 for e in burst if isinstance(e, PinAttemptsThrottled)) / 1000
        await asyncio.sleep(wait_s)                 # the policy's delay, as the error said it
        second = await outcome(listing("00000"))
        throttled_again = await outcome(listing("00001"))
        await asyncio.sleep((getattr(throttled_again, "retry_after_ms", 0) or 0) / 1000)
        right = await outcome(listing(softhsm_token.user_pin))
        after_right = await outcome(listing("00002"))
        return burst, burst_s, second, throttled_again, right, after_right

    burst, burst_s, second, throttled_again, right, after_right = asyncio.run(
        with_gateway(body, pkcs11_modules=[softhsm_token.module_path], pcsc=False))
    refused = [e for e in burst if isinstance(e, PinAttemptsThrottled)]
    assert sum(isinstance(e, PinIncorrect) for e in burst) == 1 and len(refused) == GUESSES - 1
    assert all(e.code == "RESOURCE_EXHAUSTED" and e.failures == 1 and 0 < (e.retry_after_ms or 0) <= 1000
               for e in refused)
    assert all(e.attempts_remaining is None for e in refused)   # SoftHSM2 keeps no retry counter: it cannot tell
    assert isinstance(second, PinIncorrect)                       # tried again after the delay: reached the token
    assert isinstance(throttled_again, PinAttemptsThrottled) and throttled_again.failures == 2
    assert 1000 < (throttled_again.retry_after_ms or 0) <= 2000    # the delay doubled
    assert isinstance(right, gateway_pb2.RunStepResponse)         # the right PIN, after the wait, works
    assert isinstance(after_right, PinIncorrect)                  # and ended the run: no wait before the next
    print(f"pin: {GUESSES} wrong PINs in {burst_s:.2f} s reached the SoftHSM2 token once")


def test_pin_30_wrong_verifies_at_once_reach_the_card_once_with_its_tries_left(pcscd, virtual_card):
    virtual_card.card.reset_count()

    async def body(stub):
        def verify():
            return stub.RunStep(gateway_pb2.RunStepRequest(reader_id=virtual_card.reader_id, step=steps_pb2.Step(
                apdu_script=steps_pb2.ApduScript(apdus=[steps_pb2.Apdu(command=SELECT, expected_sw=["9000"]),
                                                        steps_pb2.Apdu(command=WRONG_VERIFY, expected_sw=["9000"])]))))

        return await asyncio.gather(*(outcome(verify()) for _ in range(GUESSES)))

    burst = asyncio.run(with_gateway(body, pcsc=True))
    wrong = [e for e in burst if isinstance(e, UnexpectedStatusWord)]
    refused = [e for e in burst if isinstance(e, PinAttemptsThrottled)]
    assert len(wrong) == 1 and wrong[0].sw == 0x63C0 | (PIN_TRIES - 1)
    assert len(refused) == GUESSES - 1
    assert all(e.attempts_remaining == PIN_TRIES - 1 and (e.retry_after_ms or 0) > 0 for e in refused)
    assert virtual_card.card.apdu_count == 2                      # SELECT and one VERIFY: the card was asked once
    assert virtual_card.card.card.tries_left == PIN_TRIES - 1          # not locked by the burst
