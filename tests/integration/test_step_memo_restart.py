"""A gateway killed between a step's execution and its answer answers the resent step from
its persisted step memo after a restart, not by running it again (issue 13; docs/stations.md
"Step memo").

Real processes: a gateway (tests/support/faulty_gateway.py, in a process group of its own)
with a SoftHSM2 token, a client with its admin certificate calling the gateway's
GatewayService.RunStep with a task id and step number. The first GenerateKeyPair step runs on
the token; the gateway SIGKILLs its whole process group right after the step's result is
committed to DATA_DIR/step-memo.sqlite3, before answering. The gateway is started again
(`cardline gateway serve`) on the same data directory and the client resends the step.

"Not run again" is what the token shows: a second run of the step is refused by the token's
driver (a private key with this id is already on the token), so only a memo answer succeeds,
and the token holds one key pair. The counter-test kills the gateway just before the result
is recorded (a gateway dying mid-step): the resent step runs again and fails with that
refusal — the case the orchestrator's journal decides (docs/reconciliation.md).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import grpc
import pytest

from shared.errors import CardlineError
from shared.proto import common_pb2, gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.rpc import error_from_rpc
from tests.support.pki import default_pki
from tests.support.processes import cardline_process, channel, free_port, wait_healthy

pytestmark = pytest.mark.hardware
REPO = pathlib.Path(__file__).resolve().parents[2]
GATEWAY_ID = "memo-station"
KEY_ID = b"\x42memo"
TASK_ID, STEP_NUMBER = "task-memo-1", 1


def serve_options(address: str, data_dir: pathlib.Path, module: str) -> list[str]:
    return ["gateway", "serve", "--listen", address, "--data-dir", str(data_dir), "--gateway-id", GATEWAY_ID,
            "--pkcs11-module", module, "--no-pcsc", "--tls-dir", str(default_pki().directory)]


def generate_key_pair(pin: str) -> gateway_pb2.RunStepRequest:
    step = steps_pb2.Step(generate_key_pair=steps_pb2.GenerateKeyPair(
        key_type=common_pb2.KEY_TYPE_EC_P256, label="memo-key", key_id=KEY_ID),
        credentials=steps_pb2.Credentials(user_pin=pin))
    return gateway_pb2.RunStepRequest(step=step, task_id=TASK_ID, step_number=STEP_NUMBER)


def reader_of(stub: gateway_pb2_grpc.GatewayServiceStub, label: str) -> str:
    readers = stub.ListReaders(gateway_pb2.ListReadersRequest(), timeout=10).readers
    return next(r.reader_id for r in readers if r.token_label == label)


def keys_on_token(stub: gateway_pb2_grpc.GatewayServiceStub, reader_id: str, pin: str) -> list[int]:
    """The object classes stored under KEY_ID (a step without task id: never remembered)."""
    listing = stub.RunStep(gateway_pb2.RunStepRequest(reader_id=reader_id, step=steps_pb2.Step(
        list_objects=steps_pb2.ListObjects(), credentials=steps_pb2.Credentials(user_pin=pin))), timeout=20)
    return sorted(o.object_class for o in listing.outcome.object_list.objects if o.key_id == KEY_ID)


def killed_in_first_step(fault: str, tmp_path: pathlib.Path, token) -> tuple[str, str]:
    """Runs the faulty gateway until its fault kills it in the first GenerateKeyPair step;
    returns (reader id, the faulty gateway's log)."""
    address, log_path = f"127.0.0.1:{free_port()}", tmp_path / "faulty-gateway.log"
    default_pki().gateway(GATEWAY_ID)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.faulty_gateway", fault, "GenerateKeyPair", "--",
                                 *serve_options(address, tmp_path / "gateway", token.module_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **token.env},
                                start_new_session=True)     # its own process group: the fault kills only it
    try:
        wait_healthy(address, proc=proc)
        with channel(address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            reader_id = reader_of(stub, token.label)
            request = generate_key_pair(token.user_pin)
            request.reader_id = reader_id
            with pytest.raises(grpc.RpcError) as unanswered:
                stub.RunStep(request, timeout=30)
        assert unanswered.value.code() == grpc.StatusCode.UNAVAILABLE, unanswered.value
        assert proc.wait(timeout=20) == -9, "the gateway was not killed by its fault"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return reader_id, log_path.read_text()


def resend_after_restart(tmp_path: pathlib.Path, token, reader_id: str):
    """Starts `cardline gateway serve` on the same data directory and resends the step;
    returns (its answer or the CardlineError it failed with, the key objects on the token,
    the restarted gateway's log)."""
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "gateway-restarted.log"
    with (cardline_process(serve_options(address, tmp_path / "gateway", token.module_path), address, log_path,
                           env={**os.environ, **token.env}),
          channel(address) as ch):
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        request = generate_key_pair(token.user_pin)
        request.reader_id = reader_id
        try:
            answer: gateway_pb2.RunStepResponse | CardlineError = stub.RunStep(request, timeout=30)
        except grpc.RpcError as exc:
            answer = error_from_rpc(exc)
        objects = keys_on_token(stub, reader_id, token.user_pin)
    return answer, objects, log_path.read_text()


def test_step_memo_answers_a_step_resent_after_the_gateway_died_before_answering(tmp_path, softhsm_token):
    reader_id, faulty_log = killed_in_first_step("--kill-after-recorded", tmp_path, softhsm_token)
    answer, objects, log = resend_after_restart(tmp_path, softhsm_token, reader_id)

    assert "after the step's result is recorded" in faulty_log
    assert isinstance(answer, gateway_pb2.RunStepResponse), answer     # a second run would be refused
    assert answer.replayed
    assert answer.outcome.key_pair_generated.key_id == KEY_ID
    assert answer.outcome.key_pair_generated.public_key_der       # the first run's key, kept on disk
    # One key pair on the token: the resent step did not run again.
    assert objects == [steps_pb2.OBJECT_CLASS_PUBLIC_KEY, steps_pb2.OBJECT_CLASS_PRIVATE_KEY]
    done = [line for line in log.splitlines() if "step done" in line and TASK_ID in line]
    assert len(done) == 1 and "replayed=True" in done[0], done


def test_step_memo_runs_again_a_step_the_gateway_died_in_before_recording_it(tmp_path, softhsm_token):
    reader_id, faulty_log = killed_in_first_step("--kill-before-recorded", tmp_path, softhsm_token)
    answer, objects, _log = resend_after_restart(tmp_path, softhsm_token, reader_id)

    assert "before the step's result is recorded" in faulty_log
    # It ran on the token again: the key the first run made is there, so the token refuses.
    assert isinstance(answer, CardlineError), answer
    assert answer.reason == "WRITE_REFUSED" and "already on the token" in answer.message, answer
    assert objects == [steps_pb2.OBJECT_CLASS_PUBLIC_KEY, steps_pb2.OBJECT_CLASS_PRIVATE_KEY]
