"""The gateway's own gRPC service on a PC/SC reader: pcscd + vpcd + the card emulator,
reached through pyscard inside a gateway, called over gRPC like a local tool would."""
from __future__ import annotations

import asyncio
import tempfile

import grpc
import pytest

from gateway import app as gateway_app
from shared import config
from shared.errors import UnexpectedStatusWord
from shared.proto import gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.rpc import error_from_rpc
from tests.support.pcsc import wait_card_state
from tests.support.pki import default_pki
from tests.support.vpcd_card import APP_AID

pytestmark = pytest.mark.hardware
SELECT = bytes.fromhex("00A40400") + bytes([len(APP_AID)]) + APP_AID


def script(*apdus: tuple[bytes, list[str]]) -> steps_pb2.Step:
    return steps_pb2.Step(apdu_script=steps_pb2.ApduScript(
        apdus=[steps_pb2.Apdu(command=c, expected_sw=sw) for c, sw in apdus]))


async def with_gateway(body):
    pki = default_pki()
    pki.gateway("pcsc-station")          # mutual TLS like production: the gateway's and admin's certificates
    with tempfile.TemporaryDirectory(prefix="cardline-gw-") as data_dir:     # its CRL is kept there
        gw = await gateway_app.start(config.load(config.GatewaySettings, listen="127.0.0.1:0", pcsc=True,
                                                 gateway_id="pcsc-station", data_dir=data_dir, **pki.settings()))
        try:
            async with pki.aio_channel(gw.address) as channel:
                return await body(gateway_pb2_grpc.GatewayServiceStub(channel), gw)
        finally:
            await gw.stop()


def test_apdu_script_runs_next_to_the_reader_with_get_response_chaining(pcscd, virtual_card):
    async def body(stub, _gw):
        resp = await stub.RunStep(gateway_pb2.RunStepRequest(reader_id=virtual_card.reader_id, step=script(
            (SELECT, ["9000"]),
            (bytes.fromhex("00CA7F2100"), ["9000"]),      # 700 bytes, served through 61xx + GET RESPONSE
            (bytes.fromhex("00CA005A00"), ["9000"]),      # wrong Le: the card answers 6C08, the gateway resends
        )))
        return resp.outcome.apdu_script_result.responses

    responses = asyncio.run(with_gateway(body))
    assert [r.sw for r in responses] == [0x9000, 0x9000, 0x9000]
    assert len(responses[1].data) == 700 and len(responses[2].data) == 8


def test_malformed_apdu_is_invalid_argument_and_nothing_reaches_the_card(pcscd, virtual_card):
    virtual_card.card.reset_count()

    async def body(stub, _gw):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RunStep(gateway_pb2.RunStepRequest(reader_id=virtual_card.reader_id, step=script(
                (SELECT, ["9000"]), (bytes.fromhex("00B000"), ["9000"]))))
        return err.value

    err = asyncio.run(with_gateway(body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(err).reason == "APDU_MALFORMED" and "APDU 1" in err.details()
    assert virtual_card.card.apdu_count == 0


def test_unexpected_status_word_is_reported_with_index(pcscd, virtual_card):
    async def body(stub, _gw):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RunStep(gateway_pb2.RunStepRequest(reader_id=virtual_card.reader_id, step=script(
                (SELECT, ["9000"]), (bytes.fromhex("0020008106313131313131"), ["9000"]))))
        return error_from_rpc(err.value)

    err = asyncio.run(with_gateway(body))
    assert isinstance(err, UnexpectedStatusWord) and err.reason == "APDU_UNEXPECTED_SW"
    assert err.index == 1 and err.sw & 0xFFF0 == 0x63C0
    assert [r.sw for r in err.responses] == [0x9000, err.sw]


def test_unknown_reader_is_not_found(pcscd):
    async def body(stub, _gw):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RunStep(gateway_pb2.RunStepRequest(reader_id="pcsc:No Such Reader", step=script((SELECT, []))))
        return err.value

    err = asyncio.run(with_gateway(body))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_from_rpc(err).reason == "READER_NOT_FOUND"


def test_card_insert_and_remove_are_streamed_to_watchers(pcscd, vpcd_card_factory):
    card = vpcd_card_factory(slot=1, insert=False)
    reader = pcscd.reader_name(1)

    async def body(stub, _gw):
        events = []
        stream = stub.WatchReaders(gateway_pb2.WatchReadersRequest())

        async def collect():
            async for ev in stream:
                events.append((ev.type, ev.reader.reader_id, ev.reader.card_present))
                if ev.type == gateway_pb2.READER_EVENT_TYPE_CARD_REMOVED and ev.reader.name == reader:
                    return

        collector = asyncio.create_task(collect())
        await asyncio.sleep(0.5)
        await asyncio.to_thread(card.insert)
        await asyncio.to_thread(wait_card_state, reader, True)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(card.remove)
        await asyncio.wait_for(collector, 10)
        stream.cancel()
        return events

    events = asyncio.run(with_gateway(body))
    mine = [(t, present) for t, rid, present in events if rid == "pcsc:" + reader]
    assert (gateway_pb2.READER_EVENT_TYPE_CARD_INSERTED, True) in mine
    assert mine[-1] == (gateway_pb2.READER_EVENT_TYPE_CARD_REMOVED, False)


def test_repeated_step_is_answered_from_first_result(pcscd, virtual_card):
    virtual_card.card.reset_count()

    async def body(stub, _gw):
        request = gateway_pb2.RunStepRequest(reader_id=virtual_card.reader_id, task_id="task-1", step_number=3,
                                             step=script((SELECT, ["9000"]), (bytes.fromhex("00CA005A08"), ["9000"])))
        first = await stub.RunStep(request)
        again = await stub.RunStep(request)
        return first, again

    first, again = asyncio.run(with_gateway(body))
    assert not first.replayed and again.replayed
    assert again.outcome == first.outcome
    assert virtual_card.card.apdu_count == 2          # the card saw the script once
