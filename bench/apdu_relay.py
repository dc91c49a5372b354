"""B2 and B3 — what relaying an APDU script through the orchestrator costs.

A script of 100 APDUs on the vpcd card emulator behind a private pcscd (tests/support/pcsc_rig.py,
its own mount namespace and ports), three ways, interleaved: one RunLeasedStep through
orchestrator and gateway (the script runs next to the reader), the same APDUs sent directly
with pyscard on the same reader (connect, transaction, 100 transmits, disconnect — what the
gateway does per script), and 100 RunLeasedStep calls of one APDU each (one round trip per
APDU, how older systems relay cards).

    B2 = relayed script / direct pyscard        B3 = relayed script / one RPC per APDU

Needs root (the private pcscd) and vsmartcard-vpcd; without them both figures are null with
the reason.

    .venv/bin/python bench/apdu_relay.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import launch
from bench.common import interleaved, prepare_bench_process, say
from shared.proto import common_pb2, steps_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support import pcsc_rig
from tests.support.api import OrchestratorApi
from tests.support.processes import channel, wait_for_pooled_reader
from tests.support.vpcd_card import VpcdCard

SELECT = bytes.fromhex("00A4040C0AF0434152444C494E4501")
GET_SERIAL = bytes.fromhex("00CA005A08")
SCRIPT = [SELECT] + [GET_SERIAL] * 99                        # 100 APDUs


def measure(work: pathlib.Path, rounds: int) -> dict:
    reason = pcsc_rig.unavailable_reason()
    if reason:
        why = f"no private pcscd here: {reason}"
        return {"B2": None, "B2_note": why, "B3": None, "B3_note": why}
    handle = pcsc_rig.start_pcscd(work / "pcscd", pcsc_rig.free_base_port())
    os.environ.update(handle.env)                       # before the first PC/SC context of this process
    from smartcard import scard
    try:
        pcsc_rig.wait_vpcd_listening(handle, 0)
        card = VpcdCard(handle.slot_port(0))
        card.insert()
        reader = handle.reader_name(0)
        try:
            with contextlib.ExitStack() as stack:
                orch, _proc = stack.enter_context(launch.orchestrator(work / "orchestrator"))
                stack.enter_context(launch.gateway(orch, "bench-pcsc", work / "gw-pcsc", dict(os.environ),
                                                   ("--pcsc",)))
                wait_for_pooled_reader(orch, lambda r: r.reader.reader_id == "pcsc:" + reader and r.reader.card_present)
                stub = OrchestratorApi.on(channel(orch))
                lease = stub.leases.AcquireLease(lease_pb.AcquireLeaseRequest(selector=pool_pb.ReaderSelector(
                    kind=common_pb2.READER_KIND_PCSC, card_present=True), ttl_s=3600, holder="bench")).lease
                stack.callback(stub.leases.ReleaseLease, lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))

                def relayed(apdus: list[bytes]) -> None:
                    script = steps_pb2.ApduScript(apdus=[steps_pb2.Apdu(command=a) for a in apdus])
                    out = stub.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                        lease_id=lease.lease_id, step=steps_pb2.Step(apdu_script=script))).outcome
                    if len(out.apdu_script_result.responses) != len(apdus):
                        raise RuntimeError(f"B2: the relay answered {out} to a script of {len(apdus)} APDUs")

                _, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
                stack.callback(scard.SCardReleaseContext, context)

                def direct() -> None:
                    hresult, hcard, protocol = scard.SCardConnect(context, reader, scard.SCARD_SHARE_SHARED,
                                                                  scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
                    if hresult != scard.SCARD_S_SUCCESS:
                        raise RuntimeError(f"B2: SCardConnect: {scard.SCardGetErrorMessage(hresult)}")
                    scard.SCardBeginTransaction(hcard)
                    for a in SCRIPT:
                        hresult, response = scard.SCardTransmit(hcard, protocol, list(a))
                        if hresult != scard.SCARD_S_SUCCESS or response[-2:] != [0x90, 0x00]:
                            raise RuntimeError(f"B2: direct APDU {a.hex()} answered {hresult}, {response}")
                    scard.SCardEndTransaction(hcard, scard.SCARD_LEAVE_CARD)
                    scard.SCardDisconnect(hcard, scard.SCARD_LEAVE_CARD)

                def per_apdu() -> None:
                    for a in SCRIPT:
                        relayed([a])

                medians = interleaved({"relay": lambda: relayed(SCRIPT), "direct": direct, "per_apdu": per_apdu},
                                      rounds)
        finally:
            card.remove()
    finally:
        pcsc_rig.stop_pcscd(handle)
    return {
        "B2": round(medians["relay"] / medians["direct"], 3),
        "B3": round(medians["relay"] / medians["per_apdu"], 3),
        "B2_relay_ms": round(medians["relay"] * 1000, 2),
        "B2_direct_ms": round(medians["direct"] * 1000, 2),
        "B3_per_apdu_rpcs_ms": round(medians["per_apdu"] * 1000, 2),
    }


def main() -> None:
    prepare_bench_process()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cardline-bench-apdu-") as work:
        for key, value in measure(pathlib.Path(work), args.rounds).items():
            say(f"{key}: {value}")


if __name__ == "__main__":
    main()
