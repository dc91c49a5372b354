"""The reader pool: how production scales with gateways, and what relaying an APDU script
through the orchestrator costs.

1. Cards per second with 1, 2 and 4 gateway processes (each with its own SoftHSM2 token),
   an orchestrator process, and production orders (CreateOrder) of EC P-256 cards (one key
   pair generated on the token, a certificate from the local CA, written back), the same
   number of cards per gateway in every run. Prints cards/s and the ratio to 1 gateway.
2. A script of 100 APDUs on the vpcd card emulator behind a private pcscd, three ways,
   interleaved: one RunLeasedStep through orchestrator and gateway (the script runs next to
   the reader), the same APDUs sent directly with pyscard on the same reader (connect,
   transaction, 100 transmits, disconnect — what the gateway does per script), and 100
   RunLeasedStep calls of one APDU each (one round trip per APDU, how older systems relay
   cards). Prints medians and ratios.

    .venv/bin/python bench/pool.py [--cards-per-gateway 10] [--rounds 15]

Part 2 needs root (a private pcscd in its own mount namespace) and vsmartcard-vpcd; it is
skipped with a note otherwise. Everything runs over mutual TLS with a throwaway PKI.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.proto import common_pb2, steps_pb2  # noqa: E402
from shared.proto import lease_service_pb2 as lease_pb  # noqa: E402
from shared.proto import order_service_pb2 as order_pb  # noqa: E402
from shared.proto import reader_pool_service_pb2 as pool_pb  # noqa: E402
from tests.integration.test_pool import make_config  # noqa: E402
from tests.support import pcsc_rig, softhsm  # noqa: E402
from tests.support.api import OrchestratorApi  # noqa: E402
from tests.support.pki import default_pki  # noqa: E402
from tests.support.processes import (  # noqa: E402
    cardline_process,
    channel,
    free_port,
    gateway_process,
    orchestrator_process,
    wait_for_pooled_reader,
)
from tests.support.vpcd_card import VpcdCard  # noqa: E402

PIN, SO_PIN = "1234", "12345678"
SELECT = bytes.fromhex("00A4040C0AF0434152444C494E4501")
GET_SERIAL = bytes.fromhex("00CA005A08")
SCRIPT = [SELECT] + [GET_SERIAL] * 99                        # 100 APDUs


def start_gateway(stack: contextlib.ExitStack, work: pathlib.Path, orch: str, name: str, module: str,
                  tokens: int = 1) -> list[str]:
    """A gateway with `tokens` tokens: an order puts one person on one card (docs/lifecycle.md),
    so a gateway produces as many cards per order as it has tokens."""
    conf = softhsm.make_softhsm_dir(work / f"hsm-{name}")
    serials = [softhsm.init_token(conf, f"bench-{name}-{i}", SO_PIN, PIN) for i in range(tokens)]
    stack.enter_context(gateway_process(orch, name, work / f"gw-{name}", pkcs11_module=module,
                                        env={**os.environ, "SOFTHSM2_CONF": str(conf)}))
    for serial in serials:
        def holds_it(r, serial: str = serial) -> bool:
            return r.reader.token_serial == serial
        wait_for_pooled_reader(orch, holds_it)
    return serials


def run_order(stub, cards: int) -> float:
    """Seconds from CreateOrder to the last card done; every card must succeed."""
    t0 = time.perf_counter()
    order = stub.orders.CreateOrder(order_pb.CreateOrderRequest(
        process="pool-produce", items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text=f"Bench {i}")})
                                       for i in range(cards)], secret_inputs={"pin": PIN})).order
    for event in stub.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order.id)):
        order = event.order
    elapsed = time.perf_counter() - t0
    failed = [c for c in order.cards if c.state != order_pb.ORDER_CARD_STATE_SUCCEEDED]
    assert not failed, failed[0].error
    return elapsed


def production_scaling(work: pathlib.Path, cards_per_gateway: int) -> dict[int, float]:
    module = softhsm.find_module()
    config = make_config(work)
    # The same tokens serve every run: the bench's production re-issues them (docs/lifecycle.md).
    process = config / "processes" / "pool-produce.yaml"
    process.write_text(process.read_text().replace('    card: "${card}"\n', '    card: "${card}"\n    reissue: true\n'))
    rates: dict[int, float] = {}
    env = {**os.environ, "CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(config)}
    with contextlib.ExitStack() as stack:
        orch = stack.enter_context(orchestrator_process(work / "orchestrator", env=env))
        stub = OrchestratorApi.on(channel(orch))
        attached = 0
        for gateways in (1, 2, 4):
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: start_gateway(stack, work, orch, f"gw{i}", module, cards_per_gateway),
                              range(attached, gateways)))
            attached = gateways
            run_order(stub, gateways)                                   # warm-up: every reader once
            cards = cards_per_gateway * gateways
            elapsed = run_order(stub, cards)
            rates[gateways] = cards / elapsed
            print(f"  {gateways} gateway(s): {cards} cards in {elapsed:6.2f} s = {rates[gateways]:6.2f} cards/s",
                  flush=True)
    return rates


def apdu_relay(work: pathlib.Path, rounds: int) -> tuple[float, float, float] | None:
    reason = pcsc_rig.unavailable_reason()
    if reason:
        print(f"  skipped: {reason}")
        return None
    handle = pcsc_rig.start_pcscd(work / "pcscd", pcsc_rig.free_base_port())
    os.environ.update(handle.env)                       # before the first PC/SC context of this process
    from smartcard import scard
    try:
        pcsc_rig.wait_vpcd_listening(handle, 0)
        card = VpcdCard(handle.slot_port(0))
        card.insert()
        reader = handle.reader_name(0)
        with contextlib.ExitStack() as stack:
            orch = stack.enter_context(orchestrator_process(work / "orchestrator-apdu"))
            default_pki().gateway("bench-pcsc")
            address = f"127.0.0.1:{free_port()}"
            (work / "gw-pcsc").mkdir(parents=True, exist_ok=True)
            stack.enter_context(cardline_process(
                ["gateway", "serve", "--listen", address, "--data-dir", str(work / "gw-pcsc"), "--orchestrator", orch,
                 "--gateway-id", "bench-pcsc", "--pcsc", "--tls-dir", str(default_pki().directory)],
                address, work / "gw-pcsc" / "gateway.log", dict(os.environ)))
            wait_for_pooled_reader(orch, lambda r: r.reader.reader_id == "pcsc:" + reader and r.reader.card_present)
            stub = OrchestratorApi.on(channel(orch))
            lease = stub.leases.AcquireLease(lease_pb.AcquireLeaseRequest(selector=pool_pb.ReaderSelector(
                kind=common_pb2.READER_KIND_PCSC, card_present=True), ttl_s=600, holder="bench")).lease

            def relay_script() -> None:
                out = stub.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=steps_pb2.Step(
                    apdu_script=steps_pb2.ApduScript(apdus=[steps_pb2.Apdu(command=a) for a in SCRIPT])))).outcome
                assert len(out.apdu_script_result.responses) == len(SCRIPT)

            def relay_per_apdu() -> None:
                for a in SCRIPT:
                    stub.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                        lease_id=lease.lease_id, step=steps_pb2.Step(
                        apdu_script=steps_pb2.ApduScript(apdus=[steps_pb2.Apdu(command=a)]))))

            _, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)

            def direct() -> None:
                hresult, hcard, protocol = scard.SCardConnect(context, reader, scard.SCARD_SHARE_SHARED,
                                                              scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
                assert hresult == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hresult)
                scard.SCardBeginTransaction(hcard)
                for a in SCRIPT:
                    hresult, response = scard.SCardTransmit(hcard, protocol, list(a))
                    assert hresult == scard.SCARD_S_SUCCESS and response[-2:] == [0x90, 0x00], response
                scard.SCardEndTransaction(hcard, scard.SCARD_LEAVE_CARD)
                scard.SCardDisconnect(hcard, scard.SCARD_LEAVE_CARD)

            times: dict[str, list[float]] = {"relay": [], "direct": [], "per_apdu": []}
            arms = {"relay": relay_script, "direct": direct, "per_apdu": relay_per_apdu}
            for fn in arms.values():                                  # warm-up
                fn()
            for _ in range(rounds):
                for name, fn in arms.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            stub.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
            scard.SCardReleaseContext(context)
        card.remove()
        return tuple(statistics.median(times[k]) for k in ("relay", "direct", "per_apdu"))  # type: ignore[return-value]
    finally:
        pcsc_rig.stop_pcscd(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards-per-gateway", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="cardline-bench-pool-"))
    print(f"machine: {os.cpu_count()} CPUs; orchestrator and every gateway are separate processes (mTLS)")

    print(f"1. EC P-256 card productions by order, {args.cards_per_gateway} cards per gateway:")
    rates = production_scaling(work, args.cards_per_gateway)
    for n, rate in rates.items():
        print(f"  {n} gateway(s): {rate:6.2f} cards/s   ratio to 1 gateway {rate / rates[1]:.2f}")

    print(f"2. APDU script of {len(SCRIPT)} APDUs on the vpcd emulator, {args.rounds} interleaved rounds:")
    medians = apdu_relay(work, args.rounds)
    if medians:
        relay, direct, per_apdu = medians
        print(f"  one RunLeasedStep (script next to the reader): median {relay * 1000:8.2f} ms")
        print(f"  direct pyscard on the same reader:             median {direct * 1000:8.2f} ms")
        print(f"  100 RunLeasedStep calls of one APDU each:      median {per_apdu * 1000:8.2f} ms")
        print(f"  ratio relay / direct:       {relay / direct:.2f}")
        print(f"  ratio per-APDU RPCs / relay: {per_apdu / relay:.2f}")
        print(f"  ratio per-APDU RPCs / direct: {per_apdu / direct:.2f}")


if __name__ == "__main__":
    main()
