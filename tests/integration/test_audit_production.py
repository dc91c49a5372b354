"""The audit trail of real productions, leases and orders over mutual TLS (docs/audit.md): the
rows name the calling client's certificate, the card, each certificate with its CA serial, the
gateway, the reader and the task; carry no PIN; `cardline audit verify` passes, then fails
naming the row after an edit made directly in the database."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess

import pytest
from google.protobuf import json_format

from shared.proto import audit_service_pb2 as audit_pb
from shared.proto import audit_service_pb2_grpc, common_pb2, steps_pb2
from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import order_service_pb2 as order_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, gateway_process, orchestrator_process, wait_for_pooled_reader

pytestmark = pytest.mark.hardware
OPERATOR = "audit-operator"


def _leaves(value) -> list[str]:
    """Every string and number in a JSON value, as text (a PIN would be one of them)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [str(value)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CARDLINE, *args], capture_output=True, text=True, timeout=60)


def test_audit_rows_of_a_production_name_the_caller_card_certificates_gateway_reader_and_task(tmp_path,
                                                                                             softhsm_token):
    operator = default_pki().client(OPERATOR, "operator")
    serial = operator.certificate().serial_number
    with (orchestrator_process(tmp_path / "orchestrator") as orch,
          gateway_process(orch, "station-audit", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                          env=softhsm_token.env)):
        pooled = wait_for_pooled_reader(orch, lambda r: r.reader.token_label == softhsm_token.label)
        with default_pki().channel(orch, OPERATOR) as channel:
            events = list(OrchestratorApi.on(channel).cards.ProduceCard(card_pb.ProduceCardRequest(
                reader=pool_pb.ReaderSelector(reader_id=pooled.reader.reader_id), subject="CN=Audit Trail",
                certificates=[card_pb.CertificateRequest(template="EmployeeAuthentication",
                                                         key_type=common_pb2.KEY_TYPE_EC_P256)],
                user_pin=softhsm_token.user_pin, card_template="EmployeeCard")))
        task = events[-1].task
        assert task.state == card_pb.TASK_STATE_SUCCEEDED, task.error

        with default_pki().channel(orch) as channel:          # the auditor's view (admin)
            audit = audit_service_pb2_grpc.AuditServiceStub(channel)
            rows = list(audit.ListAuditEvents(audit_pb.ListAuditEventsRequest(task_id=task.id)).events)
            card = OrchestratorApi.on(channel).cards.GetCard(card_pb.GetCardRequest(card_id=task.card_id)).card
            [certificate] = [OrchestratorApi.on(channel).certificates.GetCertificate(
                certificate_pb.GetCertificateRequest(certificate_id=cid)).certificate for cid in card.certificate_ids]
            everything = list(audit.ListAuditEvents(audit_pb.ListAuditEventsRequest()).events)
            paged: list[audit_pb.AuditEvent] = []
            request = audit_pb.ListAuditEventsRequest(page_size=1)
            while True:
                page = audit.ListAuditEvents(request)
                paged += page.events
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
            by_certificate = list(audit.ListAuditEvents(
                audit_pb.ListAuditEventsRequest(certificate_id=certificate.id)).events)

        assert [r.action for r in rows] == ["task_started", "task_finished"]
        for row in rows:
            assert row.actor == f"operator:{OPERATOR}#{serial:x}"
            assert row.task_id == task.id
            assert (row.gateway_id, row.reader_id) == ("station-audit", pooled.reader.reader_id)
        started, finished = rows
        assert started.card_id == ""               # a production makes its card after reading it
        assert finished.card_id == task.card_id
        assert finished.detail["state"] == "SUCCEEDED" and finished.step >= 3
        assert [(c.id, c.ca, c.serial_hex) for c in finished.certificates] == [
            (certificate.id, "local", certificate.serial_hex)]
        assert [r.id for r in by_certificate] == [finished.id]
        assert everything[0].action == "configuration_loaded"
        assert [e.id for e in paged] == [e.id for e in everything] and len(everything) >= 3
        values = {leaf for r in everything for leaf in _leaves(json_format.MessageToDict(r.detail))}
        assert softhsm_token.user_pin not in values and softhsm_token.so_pin not in values

        verified = _cli("audit", "verify", "--orchestrator", orch)
        assert verified.returncode == 0, verified.stderr
        assert f"audit trail intact: {len(everything)} rows" in verified.stdout
        listed = _cli("audit", "list", "--task-id", task.id, "--json", "--orchestrator", orch)
        assert [e["action"] for e in json.loads(listed.stdout)] == ["task_started", "task_finished"]

        with sqlite3.connect(tmp_path / "orchestrator" / "cardline.db") as db:
            db.execute("UPDATE audit_events SET actor = 'client:someone-else#1' WHERE id = ?", (finished.id,))
        broken = _cli("audit", "verify", "--orchestrator", orch)
        assert broken.returncode == 1
        assert f"audit trail broken at row {finished.id}: row {finished.id} was edited" in broken.stderr
        offline = _cli("audit", "verify", "--database-url", f"sqlite:///{tmp_path / 'orchestrator' / 'cardline.db'}")
        assert offline.returncode == 1 and f"row {finished.id} was edited" in offline.stderr


def test_audit_leases_raw_steps_orders_and_processes_name_their_caller(tmp_path, softhsm_module):
    from tests.integration.test_pool import PIN, api_for, pool_rig, wait_until

    admin = f"admin:admin#{default_pki().files().certificate().serial_number:x}"

    async def body():
        async with pool_rig(tmp_path, softhsm_module, 1) as (orch, _stations, _):
            channel, api = api_for(orch)
            async with channel:
                selector = pool_pb.ReaderSelector(site="hq", card_present=True)
                lease = (await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=selector, ttl_s=30, holder="signer"))).lease
                await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())))
                await api.leases.RenewLease(lease_pb.RenewLeaseRequest(lease_id=lease.lease_id))
                await api.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
                forgotten = (await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=selector, ttl_s=1, holder="forgetful"))).lease
                await wait_until(lambda: not orch.leases.list(), what="the unrenewed lease expired")
                order = (await api.orders.CreateOrder(order_pb.CreateOrderRequest(
                    process="pool-produce", selector=pool_pb.ReaderSelector(site="hq"),
                    items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text="Person 0")})],
                    secret_inputs={"pin": PIN}))).order
                async for _ in api.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order.id)):
                    pass
            await orch.audit.drain()
            return lease, forgotten, order, orch.store.audit.list(), orch.store.audit.verify()

    lease, forgotten, order, rows, report = asyncio.run(body())
    assert report.intact, report.problems

    def of(object_id: str) -> list:
        return [r for r in rows if r.object_id == object_id]

    assert sorted(r.action for r in of(lease.lease_id)) == ["lease_acquired", "lease_ended", "lease_renewed",
                                                          "raw_step"]
    assert {r.actor for r in of(lease.lease_id)} == {admin}
    [step] = [r for r in of(lease.lease_id) if r.action == "raw_step"]
    assert step.detail["operation"] == "ReadCardInfo" and step.detail["outcome"] == "succeeded"
    assert (step.gateway_id, step.reader_id) == (lease.gateway_id, lease.reader.reader_id) and step.step
    expired = [(r.action, r.actor) for r in of(forgotten.lease_id)]
    assert sorted(expired) == [("lease_acquired", admin), ("lease_ended", "orchestrator")]
    assert "expired" in next(r for r in of(forgotten.lease_id) if r.action == "lease_ended").detail["why"]
    assert [(r.action, r.actor) for r in of(order.id)] == [("order_created", admin), ("order_finished", admin)]
    [instance_id] = {r.object_id for r in rows if r.action == "process_started"}
    assert [(r.action, r.actor) for r in of(instance_id)] == [
        ("process_started", admin), ("process_task", admin), ("process_finished", admin)]
    assert PIN not in {leaf for r in rows for leaf in _leaves(r.detail)}
