"""The gateway's step memo is bound to the caller (issue 10, steps bound to their caller;
docs/pool.md): an orchestrator and a gateway as separate processes over mutual TLS, a real
SoftHSM2 token, alice leasing it through the orchestrator and mallory — a valid client
certificate of the same CA — calling the gateway's own GatewayService with alice's
(task id, step number). Mallory's steps are answered from mallory's memo only; the
orchestrator's step runs for real and gets its own result."""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest

from shared.errors import PinAttemptsThrottled
from shared.proto import gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki
from tests.support.processes import channel, gateway_process, orchestrator_process, wait_for_pooled_reader

pytestmark = pytest.mark.hardware
WRONG_PIN = "000000"


def list_objects(pin: str) -> steps_pb2.Step:
    return steps_pb2.Step(list_objects=steps_pb2.ListObjects(), credentials=steps_pb2.Credentials(user_pin=pin))


def read_card_info() -> steps_pb2.Step:
    return steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())


def gateway_steps(log: str, task_id: str) -> list[tuple[int, str, bool]]:
    """(step number, caller, replayed) of each step the gateway ran or answered for TASK_ID
    (an attempt the wrong-PIN delay stopped before the card is neither)."""
    found = []
    for line in log.splitlines():
        if task_id in line and ("step done" in line or "step failed" in line) and "PIN_THROTTLED" not in line:
            step, caller = re.search(r"step=(\d+)", line), re.search(r"caller=(\S+)", line)
            assert step and caller, line
            found.append((int(step.group(1)), caller.group(1), "replayed=True" in line))
    return found


_T = TypeVar("_T")


def past_pin_throttle(run: Callable[[], _T], within_s: float = 30.0) -> _T:
    """RUN's answer once the gateway's wrong-PIN delay for the card (docs/limits.md) has passed:
    a throttled attempt is tried again when the gateway says the next one is accepted."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return run()
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
            if not isinstance(err, PinAttemptsThrottled) or time.monotonic() > deadline:
                raise
            time.sleep((err.retry_after_ms or 1000) / 1000)


def test_step_memo_of_another_caller_neither_seeds_nor_reads_the_orchestrators_steps(tmp_path, softhsm_token):
    for name in ("alice", "mallory"):
        default_pki().client(name)
    with (orchestrator_process(tmp_path / "orchestrator") as orch,
          gateway_process(orch, "station-1", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                          env=softhsm_token.env) as (gw, _proc),
          channel(orch, "alice") as alice_channel, channel(gw, "mallory") as mallory_channel):
        pooled = wait_for_pooled_reader(orch, lambda r: r.reader.token_label == softhsm_token.label)
        reader_id = pooled.reader.reader_id
        alice = OrchestratorApi.on(alice_channel).leases
        mallory = gateway_pb2_grpc.GatewayServiceStub(mallory_channel)
        lease = alice.AcquireLease(lease_pb.AcquireLeaseRequest(
            selector=pool_pb.ReaderSelector(reader_id=reader_id), ttl_s=60, holder="alice")).lease
        task_id = f"lease-{lease.lease_id}"                 # what the orchestrator sends for her step numbers

        def mallory_runs(step: steps_pb2.Step, number: int) -> gateway_pb2.RunStepResponse:
            return mallory.RunStep(gateway_pb2.RunStepRequest(reader_id=reader_id, step=step, task_id=task_id,
                                                              step_number=number), timeout=20)

        def alice_runs(step: steps_pb2.Step, number: int) -> steps_pb2.StepOutcome:
            return alice.RunLeasedStep(lease_pb.RunLeasedStepRequest(lease_id=lease.lease_id, step=step,
                                                                     step_number=number), timeout=20).outcome

        # Honest: mallory's own resent step is answered from mallory's memo.
        first, resent = mallory_runs(read_card_info(), 2), mallory_runs(read_card_info(), 2)
        # Hostile: mallory seeds alice's step 1 with a wrong PIN before alice sends it.
        with pytest.raises(grpc.RpcError) as seeded:
            mallory_runs(list_objects(WRONG_PIN), 1)
        # Mallory's wrong PIN also delays the card's next PIN attempt, whoever makes it.
        alices_first = past_pin_throttle(lambda: alice_runs(list_objects(softhsm_token.user_pin), 1))
        alices_resent = alice_runs(list_objects(softhsm_token.user_pin), 1)
        # Hostile: after alice's step 3 ran, mallory asks for it: mallory's own step runs instead.
        alices_third = alice_runs(list_objects(softhsm_token.user_pin), 3)
        with pytest.raises(grpc.RpcError) as read_back:
            past_pin_throttle(lambda: mallory_runs(list_objects(WRONG_PIN), 3))
        alice.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
    log = (tmp_path / "gateway" / "gateway.log").read_text()

    assert first.outcome.card_info.reader.token_serial == softhsm_token.serial and not first.replayed
    assert resent.replayed and resent.outcome == first.outcome
    assert error_from_rpc(seeded.value).reason == "PIN_INCORRECT"
    # Alice's step 1 ran on the token with her PIN, not answered with mallory's error.
    assert alices_first.WhichOneof("result") == "object_list"
    assert alices_resent == alices_first                      # her own resend: from her memo
    assert alices_third.WhichOneof("result") == "object_list"
    assert error_from_rpc(read_back.value).reason == "PIN_INCORRECT"   # not alice's listing
    steps = gateway_steps(log, task_id)
    link = [(n, replayed) for n, caller, replayed in steps if caller.startswith("link:")]
    direct = [(n, replayed) for n, caller, replayed in steps if caller.startswith("admin:mallory#")]
    assert link == [(1, False), (1, True), (3, False)]
    assert direct == [(2, False), (2, True), (1, False), (3, False)]
