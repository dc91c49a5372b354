"""A card's life end to end on a real SoftHSM2 token, through a gateway process, with the
local CA and with a real `openssl ca`: the lifecycle processes of examples/processes/
(docs/lifecycle.md) lock, unlock, report lost and retire a produced card; after each, the
CA's CRL as `openssl crl -text` reads it and the store agree on every certificate of the card
(C17: CA first, store after). The same token presented twice for production is refused."""
from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import subprocess

import pytest

from orchestrator import app as orchestrator_app
from orchestrator.domain.processes import CoreObjectDescriptor
from shared import config
from tests.support.crl import openssl_crl_reasons
from tests.support.pki import default_pki
from tests.support.processes import gateway_process
from tests.support.transport_puk import write_transport_key

pytestmark = pytest.mark.hardware
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PIN = "246810"

#: Store state of a certificate -> the reason its CA's CRL must show (None: not on the CRL).
CRL_REASON_OF_STATE = {"Active": None, "OnHold": "certificateHold", "Revoked": "keyCompromise",
                       "Retired": "cessationOfOperation"}


def lifecycle_config(tmp_path: pathlib.Path, ca: str) -> pathlib.Path:
    target = tmp_path / "config"
    shutil.copytree(EXAMPLES, target)
    write_transport_key(target / "secrets")
    if ca != "local":
        templates = target / "templates" / "templates.yaml"
        templates.write_text(templates.read_text().replace("    ca: local\n", f"    ca: {ca}\n"))
    return target


@contextlib.asynccontextmanager
async def station(tmp_path: pathlib.Path, token, ca: str):
    """An in-process orchestrator (the example configuration, certificates from `ca`) and a
    gateway process at site hq holding `token`."""
    cas = [{"name": "corp", "kind": "openssl", "directory": str(tmp_path / "openssl-ca")}] if ca == "corp" else []
    settings = config.load(config.OrchestratorSettings, listen="127.0.0.1:0", migrate=True,
                           data_dir=tmp_path / "orchestrator",
                           config_dir=lifecycle_config(tmp_path, ca), step_timeout_s=30, cas=cas,
                           **default_pki().settings())
    orch = await orchestrator_app.start(settings)
    try:
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, gateway_process(
                orch.address, "station-1", tmp_path / "gateway", pkcs11_module=token.module_path,
                env=token.env, site="hq"))
            for _ in range(200):
                if any(p.reader.token_serial == token.serial for p in orch.pool.list()):
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("the gateway's tokens did not come into the pool within 20 s")
            yield orch
    finally:
        await orch.stop()


def token_objects(token) -> str:
    """OpenSC's view of the token: an independent check of what is on it."""
    return subprocess.run(
        ["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login", "--pin", PIN,
         "--list-objects"], env=token.env, capture_output=True, text=True, check=True).stdout


class Life:
    def __init__(self, orch, ca: str) -> None:
        self.orch, self.ca = orch, orch.cas[ca]

    async def run(self, process: str, **inputs):
        instance = await self.orch.processes.start(process, inputs)
        assert instance.state == "SUCCEEDED", (process, instance.error_reason, instance.error_message)
        return instance

    def card_certificates(self, card_id: str):
        return [self.orch.store.certificates.get(i) for i in self.orch.store.cards.certificate_ids(card_id)]

    def assert_crl_agrees_with_store(self, card_id: str, expected_state: str) -> None:
        """Every certificate of the card is in `expected_state` in the store, and the CA's CRL
        (read by `openssl crl -text`) shows exactly what that state means."""
        crl = openssl_crl_reasons(self.ca)
        certificates = self.card_certificates(card_id)
        assert len(certificates) == 2                      # authentication and signature
        for cert in certificates:
            assert cert.state == expected_state, (cert.id, cert.state)
            assert crl.get(cert.serial) == CRL_REASON_OF_STATE[cert.state], (cert.serial_hex, crl)


@pytest.mark.parametrize("ca", ["local", "corp"], ids=["local-ca", "openssl-ca"])
def test_lock_unlock_report_lost_and_retire_keep_the_crl_and_the_store_in_agreement(tmp_path, softhsm_token, ca):
    async def body():
        async with station(tmp_path, softhsm_token, ca) as orch:
            life = Life(orch, ca)
            produced = await life.run("produce-employee-card", person="Jane Doe", pin=PIN)
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            assert orch.store.cards.get(card.id).identity == f"pkcs11:{softhsm_token.serial}"
            life.assert_crl_agrees_with_store(card.id, "Active")

            # The same token presented again: refused, naming the card and its card object.
            again = await orch.processes.start("produce-employee-card", {"person": "John Doe", "pin": PIN})
            assert again.state == "FAILED" and again.error_reason == "ALREADY_EXISTS"
            assert f"pkcs11:{softhsm_token.serial}" in again.error_message and card.id in again.error_message
            assert orch.store.cards.live(f"pkcs11:{softhsm_token.serial}").id == card.id

            await life.run("lock-card", card=card)
            assert orch.store.cards.get(card.id).state == "Locked"
            life.assert_crl_agrees_with_store(card.id, "OnHold")

            await life.run("unlock-card", card=card)
            assert orch.store.cards.get(card.id).state == "Active"
            life.assert_crl_agrees_with_store(card.id, "Active")

            await life.run("report-lost", card=card)
            assert orch.store.cards.get(card.id).state == "Lost"
            life.assert_crl_agrees_with_store(card.id, "Revoked")

            # Lost is final: the token, found again, can be produced for someone else.
            reissued = await life.run("produce-employee-card", person="John Doe", pin=PIN)
            second = CoreObjectDescriptor.from_dict(reissued.process_map["card"])
            assert "Authentication" in await asyncio.to_thread(token_objects, softhsm_token)

            await life.run("retire-card", card=second, pin=PIN)
            assert orch.store.cards.get(second.id).state == "Retired"
            life.assert_crl_agrees_with_store(second.id, "Retired")
            life.assert_crl_agrees_with_store(card.id, "Revoked")        # the first card's are untouched
            listing = await asyncio.to_thread(token_objects, softhsm_token)
            assert "Private Key Object" not in listing and "Certificate Object" not in listing, listing
            assert orch.store.cards.live(f"pkcs11:{softhsm_token.serial}") is None

    asyncio.run(body())
