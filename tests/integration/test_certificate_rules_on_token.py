"""Rules C1 and C3 on a real SoftHSM2 token: an in-process orchestrator whose step boundaries
the test hooks into, a gateway as a separate process, faults injected with real tools.

C1–C3 are proven fast, without hardware, in tests/rules/ (a fake gateway). This module keeps
what only the real token shows: with pkcs11-tool it sees no certificate on the token until
the store holds it (C1), and the real driver's answers when the token is deleted or refuses
a certificate whose key was removed behind its back (C3)."""
from __future__ import annotations

import asyncio
import contextlib
import subprocess

import pytest

from orchestrator import app as orchestrator_app
from orchestrator.services.pool import ReaderSelector
from orchestrator.services.production import CertificateOrder, production_order
from shared import cards, config
from tests.support import softhsm
from tests.support.pki import default_pki
from tests.support.processes import gateway_process

pytestmark = pytest.mark.hardware

ORDER = (CertificateOrder("EmployeeAuthentication", cards.KeyType.EC_P256),
         CertificateOrder("EmployeeSignature", cards.KeyType.EC_P256))


def pkcs11_tool(token, *args: str) -> str:
    return subprocess.run(["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login",
                           "--pin", token.user_pin, *args], env=token.env, capture_output=True, text=True,
                          check=True).stdout


async def produce_with_hook(tmp_path, token, hook, subject: str = "CN=Rule Tester"):
    """Runs one production with `hook(boundary, task_id, orchestrator)` called at every boundary."""
    settings = config.load(config.OrchestratorSettings, listen="127.0.0.1:0", data_dir=tmp_path / "orchestrator",
                           migrate=True,
                           step_timeout_s=20, **default_pki().settings())
    holder: dict[str, orchestrator_app.Orchestrator] = {}

    async def boundary(name: str, task_id: str) -> None:
        await hook(name, task_id, holder["orchestrator"])

    orch = holder["orchestrator"] = await orchestrator_app.start(settings, boundary=boundary)
    try:
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, gateway_process(
                orch.address, "station-1", tmp_path / "gateway", pkcs11_module=token.module_path, env=token.env))
            for _ in range(100):
                if orch.pool.list(ReaderSelector()):
                    break
                await asyncio.sleep(0.1)
            reader = next(p.reader for p in orch.pool.list() if p.reader.token_label == token.label)
            outcome = await orch.card_tasks.run(production_order(
                orch.configuration.templates, ReaderSelector(reader_id=reader.reader_id), subject, ORDER,
                token.user_pin, card_template="EmployeeCard"))
            return orch, outcome.task
    finally:
        await orch.stop()


def test_c1_certificate_committed_as_issued_before_the_card_write(tmp_path, softhsm_token):
    seen = []

    async def hook(name, task_id, orch):
        if name == "after_store":
            stored = orch.store.certificates.list(task_id=task_id)
            on_token = await asyncio.to_thread(pkcs11_tool, softhsm_token, "--list-objects", "--type", "cert")
            seen.append(([c.state for c in stored], on_token.count("Certificate Object")))

    _orch, task = asyncio.run(produce_with_hook(tmp_path, softhsm_token, hook))
    assert task.state == "SUCCEEDED"
    # At each boundary the newest certificate is in the store as Issued, not yet on the token.
    assert seen == [(["Issued"], 0), (["Issued", "Issued"], 1)]


def test_c3_token_removed_after_issuance_leaves_certificates_issued(tmp_path, softhsm_token):
    stores = []

    async def hook(name, task_id, orch):
        if name == "after_store":
            stores.append(task_id)
            if len(stores) == 2:      # the second certificate is stored; pull the token before it is written
                await asyncio.to_thread(softhsm.delete_token, softhsm_token.conf_path, softhsm_token.serial)

    orch, task = asyncio.run(produce_with_hook(tmp_path, softhsm_token, hook))
    assert task.state == "FAILED"
    assert task.error_reason in {"CARD_REMOVED", "CARD_NOT_PRESENT", "CARD_IO", "READER_NOT_FOUND"}
    certs = orch.store.certificates.list(task_id=task.id)
    assert len(certs) == 2
    assert {c.state for c in certs} == {"Issued"}                      # C3
    assert {c.task_error_reason for c in certs} == {task.error_reason}  # C4: each hit carries the error
    assert orch.store.relations.list(source_id=task.card_id) == []      # C10 default: no relation on failure
    assert orch.store.cards.get(task.card_id).state == "ProductionFailed"
    assert orch.store.certificates.list(state="Issued") == certs


def test_c3_write_refused_after_issuance_leaves_certificate_issued(tmp_path, softhsm_token):
    async def hook(name, task_id, orch):
        if name == "after_store":
            # Delete the new private key with OpenSC behind the gateway's back: the card
            # then refuses to store a certificate whose key it no longer has.
            listing = await asyncio.to_thread(pkcs11_tool, softhsm_token, "--list-objects", "--type", "privkey")
            key_id = next(line.split(":", 1)[1].strip() for line in listing.splitlines()
                          if line.strip().startswith("ID:"))
            await asyncio.to_thread(pkcs11_tool, softhsm_token, "--delete-object", "--type", "privkey", "--id", key_id)

    orch, task = asyncio.run(produce_with_hook(tmp_path, softhsm_token, hook))
    assert task.state == "FAILED" and task.error_reason == "WRITE_REFUSED", task
    certs = orch.store.certificates.list(task_id=task.id)
    assert [c.state for c in certs] == ["Issued"]
    assert "Certificate Object" not in pkcs11_tool(softhsm_token, "--list-objects", "--type", "cert")


