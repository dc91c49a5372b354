"""B1 — what cardline adds to a card production: orchestrator + gateway over gRPC with the
store and the step journal, versus the same token and CA operations in one process.

Both arms run on SoftHSM2 tokens of the same directory and the same kind of local CA; runs
are interleaved (A, B, A, B, ...) so machine noise hits both alike; objects made by a run are
deleted, untimed, after it. The orchestrator's store transactions (SQLite) are counted per
card (bench/counted_cardline.py). Prints medians and their ratio.

    .venv/bin/python bench/overhead.py [--runs 15] [--profile ec|demo]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import launch
from bench.common import interleaved, prepare_bench_process, say
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from orchestrator.ca.base import PASSPHRASE_ENV, IssueProfile
from orchestrator.ca.local import LocalCa
from shared import cards
from shared.proto import card_service_pb2 as card_pb
from shared.proto import (
    card_service_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    process_service_pb2,
    process_service_pb2_grpc,
    steps_pb2,
)
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support import softhsm
from tests.support.processes import channel, wait_for_pooled_reader

PIN = "1234"
SUBJECT = "CN=Bench Employee,O=cardline bench"
PROFILES = {
    "ec": [("EmployeeAuthentication", cards.KeyType.EC_P256), ("EmployeeSignature", cards.KeyType.EC_P256)],
    "demo": [("EmployeeAuthentication", cards.KeyType.EC_P256), ("EmployeeSignature", cards.KeyType.RSA_2048)],
}
PROTO_KEY = {cards.KeyType.EC_P256: common_pb2.KEY_TYPE_EC_P256, cards.KeyType.RSA_2048: common_pb2.KEY_TYPE_RSA_2048}


def direct_production(driver: Pkcs11TokenDriver, slot_id: int, ca: LocalCa, apps, run: int) -> list[bytes]:
    key_ids = []
    for i, (template, key_type) in enumerate(apps):
        key_id = os.urandom(16)
        generated = driver.generate_key_pair(slot_id, PIN, key_type, template, key_id, SUBJECT)
        der = ca.issue(generated.csr_der, IssueProfile(validity_days=730, subject="CN=Bench"), f"direct:{run}:{i}")
        driver.write_certificate(slot_id, PIN, key_id, template, der)
        key_ids.append(key_id)
    return key_ids


def measure(work: pathlib.Path, runs: int, profile: str = "ec") -> dict:
    """B1 and the store's transactions per card (all, and the writing ones)."""
    apps = PROFILES[profile]
    conf = softhsm.make_softhsm_dir(work / "softhsm")
    # Both CAs' key passphrase: a file outside their directories (made on first start), named by the variable.
    os.environ[PASSPHRASE_ENV] = str(work / "ca-passphrase")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    os.environ["SOFTHSM2_CONF"] = str(conf)             # for the direct arm's driver in this process
    serial_pipe = softhsm.init_token(conf, "bench-pipeline", "12345678", PIN)
    serial_direct = softhsm.init_token(conf, "bench-direct", "12345678", PIN)
    module = softhsm.find_module()
    driver = Pkcs11TokenDriver(module)
    slot_direct = softhsm.token_slot_id(conf, serial_direct)
    ca = LocalCa(work / "direct-ca")
    counter = launch.TransactionCounter(work / "transactions")
    per_card: list[launch.Transactions] = []

    try:
        with launch.orchestrator(work / "orchestrator", env, counter=counter) as (orch, _proc), \
                launch.gateway(orch, "bench-b1", work / "gateway", env,
                               ("--pkcs11-module", module, "--no-pcsc")) as gw:
            reader = wait_for_pooled_reader(orch, lambda r: r.reader.token_serial == serial_pipe).reader
            stub = card_service_pb2_grpc.CardServiceStub(channel(orch))
            gw_stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
            processes = process_service_pb2_grpc.ProcessServiceStub(channel(orch))
            request = card_pb.ProduceCardRequest(
                reader=pool_pb.ReaderSelector(reader_id=reader.reader_id), subject=SUBJECT, user_pin=PIN,
                certificates=[card_pb.CertificateRequest(template=t, key_type=PROTO_KEY[k]) for t, k in apps],
                card_template="EmployeeCard")
            produced: list[str] = []
            direct_keys: list[bytes] = []

            def pipeline() -> None:
                before = counter.read()
                task = list(stub.ProduceCard(request))[-1].task
                per_card.append(counter.read() - before)
                if task.state != card_pb.TASK_STATE_SUCCEEDED:
                    raise RuntimeError(f"B1: the production failed: {task.error}")
                produced.append(task.card_id)

            def clean_pipeline_token() -> None:
                """Retire the card object just made (a token holds one live card object,
                docs/lifecycle.md; retire-card also erases the card) and delete what is left,
                so both tokens stay the same size."""
                card = common_pb2.CoreObjectDescriptor(type="Card", template="EmployeeCard", id=produced[-1])
                instance = list(processes.StartProcess(process_service_pb2.StartProcessRequest(
                    process="retire-card", inputs={"card": common_pb2.Value(descriptor=card)},
                    secret_inputs={"pin": PIN})))[-1].instance
                if instance.state != process_service_pb2.PROCESS_STATE_SUCCEEDED:
                    raise RuntimeError(f"B1: retiring the bench card failed: {instance.error}")

                def step(**op):
                    return gw_stub.RunStep(gateway_pb2.RunStepRequest(reader_id=reader.reader_id, step=steps_pb2.Step(
                        credentials=steps_pb2.Credentials(user_pin=PIN), **op))).outcome
                for key_id in {o.key_id for o in step(list_objects=steps_pb2.ListObjects()).object_list.objects}:
                    step(delete_objects=steps_pb2.DeleteObjects(key_id=key_id))

            def direct() -> None:
                direct_keys[:] = direct_production(driver, slot_direct, ca, apps, len(produced))

            def clean_direct_token() -> None:
                for key_id in direct_keys:
                    driver.delete_objects(slot_direct, PIN, key_id)

            medians = interleaved({"pipeline": pipeline, "direct": direct}, runs,
                                  after={"pipeline": clean_pipeline_token, "direct": clean_direct_token})
    finally:
        driver.close()
    timed = per_card[1:]                                 # the warm-up card is not counted
    return {
        "B1": round(medians["pipeline"] / medians["direct"], 3),
        "B1_pipeline_ms": round(medians["pipeline"] * 1000, 1),
        "B1_direct_ms": round(medians["direct"] * 1000, 1),
        "B1_transactions_per_card": statistics.median(t.total for t in timed),
        "B1_write_transactions_per_card": statistics.median(t.writes for t in timed),
        "B1_write_lock_wait_ms_per_card": round(statistics.median(t.write_lock_wait_us for t in timed) / 1000, 2),
        "B1_profile": f"{profile}: " + " + ".join(f"{t} {k.value}" for t, k in apps),
    }


def main() -> None:
    prepare_bench_process()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ec")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cardline-bench-b1-") as work:
        result = measure(pathlib.Path(work), args.runs, args.profile)
    for key, value in result.items():
        say(f"{key}: {value}")


if __name__ == "__main__":
    main()
