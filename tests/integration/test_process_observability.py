"""Metrics and logs of real `cardline orchestrator serve` and `cardline gateway serve`
processes around a card production on a SoftHSM2 token (docs/observability.md)."""
from __future__ import annotations

import contextlib
import json
import subprocess
import time

import pytest

from gateway.core.pin_guard import delay as pin_delay
from shared.proto import card_service_pb2 as card_pb
from shared.proto import common_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support.api import OrchestratorApi
from tests.support.processes import CARDLINE, free_port, gateway_process, orchestrator_process, wait_for_pooled_reader
from tests.support.processes import channel as client_channel
from tests.support.scrape import Samples, scrape

pytestmark = pytest.mark.hardware
AUTH = card_pb.CertificateRequest(template="EmployeeAuthentication", key_type=common_pb2.KEY_TYPE_EC_P256)


def produce(orch: str, reader_id: str, pin: str) -> card_pb.Task:
    with client_channel(orch) as channel:
        events = list(OrchestratorApi.on(channel).cards.ProduceCard(card_pb.ProduceCardRequest(
            reader=pool_pb.ReaderSelector(reader_id=reader_id), subject="CN=Metrics Tester", certificates=[AUTH],
            user_pin=pin, card_template="EmployeeCard")))
    return events[-1].task


def scrape_until(address: str, condition, what: str, timeout_s: float = 30.0) -> Samples:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(address)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}\n{samples.text}")
        time.sleep(0.1)


def test_gateway_metrics_count_steps_link_and_reconnects_around_a_production(tmp_path, softhsm_token):
    orchestrator_address = f"127.0.0.1:{free_port()}"
    gateway_metrics = f"127.0.0.1:{free_port()}"
    orchestrator_metrics = f"127.0.0.1:{free_port()}"
    with contextlib.ExitStack() as running, contextlib.ExitStack() as first_orchestrator:
        orch = first_orchestrator.enter_context(orchestrator_process(
            tmp_path / "orchestrator", address=orchestrator_address, args=("--metrics-listen", orchestrator_metrics)))
        running.enter_context(gateway_process(orch, "station-1", tmp_path / "gateway",
                                              pkcs11_module=softhsm_token.module_path, env=softhsm_token.env,
                                              args=("--metrics-listen", gateway_metrics)))
        reader = wait_for_pooled_reader(orch, lambda r: r.reader.token_label == softhsm_token.label).reader
        assert produce(orch, reader.reader_id, "not-the-pin").state == card_pb.TASK_STATE_FAILED
        time.sleep(pin_delay(1))          # the gateway's wait after a wrong PIN (docs/limits.md), not a guess
        assert produce(orch, reader.reader_id, softhsm_token.user_pin).state == card_pb.TASK_STATE_SUCCEEDED
        central = scrape(orchestrator_metrics)
        before = scrape(gateway_metrics)
        # The orchestrator restarts on the same address and data: the gateway dials again.
        first_orchestrator.close()
        running.enter_context(orchestrator_process(tmp_path / "orchestrator", address=orchestrator_address))
        after = scrape_until(gateway_metrics,
                             lambda m: m.value("cardline_gateway_orchestrator_reconnects_total") >= 1
                             and m.value("cardline_gateway_orchestrator_link_up") == 1,
                             "the gateway relinked to the restarted orchestrator")

    assert before.value("cardline_gateway_orchestrator_link_up") == 1
    for operation in ("ReadCardInfo", "GenerateKeyPair", "WriteCertificates"):
        assert before.value("cardline_gateway_step_duration_seconds_count", operation=operation, outcome="ok") >= 1
        assert before.value("cardline_gateway_step_duration_seconds_sum", operation=operation) > 0
    assert before.value("cardline_gateway_step_duration_seconds_count", outcome="failed") == 1
    assert before.value("cardline_gateway_step_failures_total", operation="GenerateKeyPair",
                        reason="PIN_INCORRECT") == 1
    assert before.value("cardline_gateway_readers", kind="PKCS11", card_present="true") >= 1
    assert after.value("cardline_gateway_orchestrator_reconnects_total") >= 1

    assert central.value("cardline_card_task_duration_seconds_count", type="card_production", outcome="SUCCEEDED") == 1
    assert central.value("cardline_card_task_failures_total", reason="PIN_INCORRECT") == 1
    assert central.value("cardline_ca_request_duration_seconds_count", ca="local", operation="issue") == 1
    assert central.value("cardline_certificates", state="Active") == 1
    assert central.value("cardline_readers", state="CARD_PRESENT") >= 1
    assert central.value("cardline_gateway_links", state="connected") == 1
    assert central.value("cardline_pool_queue_wait_seconds_count", kind="task") == 2


def test_json_logs_every_line_of_an_orchestrator_run_is_json_and_carries_no_secret(tmp_path, softhsm_token):
    data_dir = tmp_path / "orchestrator"
    with orchestrator_process(data_dir, args=("--json-logs", "--log-level", "INFO")) as orch, \
            gateway_process(orch, "station-1", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                            env=softhsm_token.env, args=("--json-logs",)):
        reader = wait_for_pooled_reader(orch, lambda r: r.reader.token_label == softhsm_token.label).reader
        assert produce(orch, reader.reader_id, "9999").state == card_pb.TASK_STATE_FAILED     # a wrong PIN
        time.sleep(pin_delay(1))          # the gateway's wait after a wrong PIN (docs/limits.md), not a guess
        assert produce(orch, reader.reader_id, softhsm_token.user_pin).state == card_pb.TASK_STATE_SUCCEEDED
    # Both processes have stopped (SIGTERM): start-up, migrations, productions and shut-down are logged.
    secrets = {softhsm_token.user_pin, softhsm_token.so_pin, "9999"}
    for log_path, expected in ((data_dir / "orchestrator.log", {"orchestrator serving", "card task failed"}),
                               (tmp_path / "gateway" / "gateway.log", {"gateway serving", "step done"})):
        text = log_path.read_text()
        lines = [json.loads(line) for line in text.splitlines()]     # fails on the first line that is not JSON
        assert all(isinstance(line, dict) and {"event", "level", "timestamp"} <= line.keys() for line in lines)
        assert expected <= {line["event"] for line in lines}, log_path
        values = {str(v) for line in lines for v in line.values()}
        assert not values & secrets and "PRIVATE KEY" not in text
    orchestrator_lines = [json.loads(line) for line in (data_dir / "orchestrator.log").read_text().splitlines()]
    # Alembic's lines come through the same formatter; a failed task is a warning.
    assert any(line.get("logger", "").startswith("alembic") for line in orchestrator_lines)
    assert {line["level"] for line in orchestrator_lines if line["event"] == "card task failed"} == {"warning"}


def test_json_logs_a_broken_configuration_directory_is_a_json_line_and_nothing_is_created(tmp_path):
    data_dir = tmp_path / "orchestrator"
    done = subprocess.run([CARDLINE, "orchestrator", "serve", "--json-logs", "--insecure", "--listen", "127.0.0.1:0",
                           "--data-dir", str(data_dir), "--config-dir", str(tmp_path / "no-such-config")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    [error] = [line for line in lines if line["level"] == "error"]
    assert error["event"] == "configuration error" and "no-such-config" in error["error"]
    assert not data_dir.exists()
