"""What cardline adds to a card production: orchestrator + gateway over gRPC with the store
and the step journal, versus the same token and CA operations in one process.

Both arms run on SoftHSM2 tokens of the same directory and the same local CA; runs are
interleaved (A, B, A, B, ...) so machine noise hits both alike; objects made by a run are
deleted, untimed, after it. Prints medians and their ratio.

    .venv/bin/python bench/overhead.py [--runs 15] [--profile demo|ec]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.drivers.pkcs11 import Pkcs11TokenDriver  # noqa: E402
from orchestrator.ca.base import PASSPHRASE_ENV, IssueProfile  # noqa: E402
from orchestrator.ca.local import LocalCa  # noqa: E402
from shared import cards  # noqa: E402
from shared.proto import card_service_pb2 as card_pb  # noqa: E402
from shared.proto import (  # noqa: E402
    card_service_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    process_service_pb2,
    process_service_pb2_grpc,
    steps_pb2,
)
from shared.proto import reader_pool_service_pb2 as pool_pb  # noqa: E402
from tests.support import softhsm  # noqa: E402
from tests.support.processes import (  # noqa: E402
    channel,
    gateway_process,
    orchestrator_process,
    wait_for_pooled_reader,
)

PIN = "1234"
SUBJECT = "CN=Bench Employee,O=cardline bench"
PROFILES = {
    "demo": [("EmployeeAuthentication", cards.KeyType.EC_P256), ("EmployeeSignature", cards.KeyType.RSA_2048)],
    "ec": [("EmployeeAuthentication", cards.KeyType.EC_P256), ("EmployeeSignature", cards.KeyType.EC_P256)],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    args = parser.parse_args()
    apps = PROFILES[args.profile]

    work = pathlib.Path(tempfile.mkdtemp(prefix="cardline-bench-"))
    conf = softhsm.make_softhsm_dir(work / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    # Both CAs' key passphrase: a file outside their directories (made on first start), named by the variable.
    os.environ[PASSPHRASE_ENV] = str(work / "ca-passphrase")
    serial_pipe = softhsm.init_token(conf, "bench-pipeline", "12345678", PIN)
    serial_direct = softhsm.init_token(conf, "bench-direct", "12345678", PIN)
    module = softhsm.find_module()
    driver = Pkcs11TokenDriver(module)
    slot_direct = softhsm.token_slot_id(conf, serial_direct)
    ca = LocalCa(work / "direct-ca")

    with orchestrator_process(work / "orchestrator") as orch, \
            gateway_process(orch, "bench", work / "gateway", pkcs11_module=module, env=dict(os.environ)) as (gw, _p):
        reader = wait_for_pooled_reader(orch, lambda r: r.reader.token_serial == serial_pipe).reader
        # mutual TLS like production (a throwaway PKI from tests/support/pki.py)
        stub = card_service_pb2_grpc.CardServiceStub(channel(orch))
        gw_stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
        request = card_pb.ProduceCardRequest(
            reader=pool_pb.ReaderSelector(reader_id=reader.reader_id), subject=SUBJECT, user_pin=PIN,
            certificates=[card_pb.CertificateRequest(template=t, key_type=PROTO_KEY[k]) for t, k in apps],
            card_template="EmployeeCard")

        processes = process_service_pb2_grpc.ProcessServiceStub(channel(orch))
        produced: list[str] = []

        def pipeline_production() -> None:
            task = list(stub.ProduceCard(request))[-1].task
            assert task.state == card_pb.TASK_STATE_SUCCEEDED, task.error
            produced.append(task.card_id)

        def clean_pipeline_token() -> None:
            """Untimed: retire the card object just made (a token holds one live card object,
            docs/lifecycle.md; retire-card also erases the card) and delete what is left, so
            both tokens stay the same size."""
            card = common_pb2.CoreObjectDescriptor(type="Card", template="EmployeeCard", id=produced[-1])
            instance = list(processes.StartProcess(process_service_pb2.StartProcessRequest(
                process="retire-card", inputs={"card": common_pb2.Value(descriptor=card)},
                secret_inputs={"pin": PIN})))[-1].instance
            assert instance.state == process_service_pb2.PROCESS_STATE_SUCCEEDED, instance.error
            def step(**op):
                return gw_stub.RunStep(gateway_pb2.RunStepRequest(reader_id=reader.reader_id, step=steps_pb2.Step(
                    credentials=steps_pb2.Credentials(user_pin=PIN), **op))).outcome
            for key_id in {o.key_id for o in step(list_objects=steps_pb2.ListObjects()).object_list.objects}:
                step(delete_objects=steps_pb2.DeleteObjects(key_id=key_id))

        pipeline_s: list[float] = []
        direct_s: list[float] = []
        pipeline_production()                                        # warm-up, both arms
        clean_pipeline_token()
        for key_id in direct_production(driver, slot_direct, ca, apps, -1):
            driver.delete_objects(slot_direct, PIN, key_id)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            pipeline_production()
            pipeline_s.append(time.perf_counter() - t0)
            clean_pipeline_token()

            t0 = time.perf_counter()
            key_ids = direct_production(driver, slot_direct, ca, apps, len(direct_s))
            direct_s.append(time.perf_counter() - t0)
            for key_id in key_ids:
                driver.delete_objects(slot_direct, PIN, key_id)
    driver.close()

    p, d = statistics.median(pipeline_s), statistics.median(direct_s)
    print(f"profile {args.profile}: {' + '.join(f'{t} {k.value}' for t, k in apps)}; {args.runs} interleaved runs")
    print(f"  through orchestrator + gateway (gRPC, store, journal): median {p * 1000:8.1f} ms")
    print(f"  same token and CA operations in one process:          median {d * 1000:8.1f} ms")
    print(f"  ratio pipeline / direct: {p / d:.2f}   (target <= 1.5)")
    print(f"  added per card: {(p - d) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
