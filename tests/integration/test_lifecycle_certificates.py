"""Renewal, replacement and temporary cards on real SoftHSM2 tokens with `openssl ca` as the CA
(docs/lifecycle.md): the shipped processes `renew-certificates`, `replace-card`,
`issue-temporary-card` and `restore-card`. After each, the CA's CRL (read with
`openssl crl -text`) and the store agree on every certificate of the cards: held, released,
revoked with the right reason."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re

import pytest

from orchestrator import app as orchestrator_app
from orchestrator.domain.processes import CoreObjectDescriptor
from shared.errors import CardRemoved
from tests.integration.test_process_rules import PIN, config_dir, config_load
from tests.support import softhsm
from tests.support.lifecycle import CRL_REASON_OF_STATE, cardline_cli, crl_reasons, use_reader
from tests.support.processes import gateway_process

pytestmark = pytest.mark.hardware
PERSON = "Jane Doe"


def _config(tmp_path, *, validity_days: int | None = None):
    """The examples with every certificate template on the `openssl ca` CA "corp"."""
    cfg = config_dir(tmp_path)
    for templates in (cfg / "templates").glob("*.yaml"):
        text = templates.read_text().replace("ca: local", "ca: corp")
        if validity_days is not None:      # the employee templates only, not the temporary one
            text = text.replace("validity_days: 730", f"validity_days: {validity_days}")
        templates.write_text(text)
    return cfg


@contextlib.asynccontextmanager
async def _running(tmp_path, token, cfg, *, cards: int = 1, boundary=None):
    """An in-process orchestrator with `openssl ca` "corp", a gateway process, and `cards`
    tokens (the fixture's first); yields (orchestrator, serials)."""
    serials = [token.serial] + [softhsm.init_blank_token(token.conf_path, f"{token.label}-{i}", token.user_pin)
                                for i in range(cards - 1)]
    settings = config_load(tmp_path, cfg, cas=[{"name": "corp", "kind": "openssl",
                                                "directory": str(tmp_path / "openssl-ca")}])
    orch = await orchestrator_app.start(settings, boundary=boundary)
    try:
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, gateway_process(
                orch.address, "station-1", tmp_path / "gateway", pkcs11_module=token.module_path,
                env=token.env, site="hq"))
            for _ in range(200):
                if {p.reader.token_serial for p in orch.pool.list()} >= set(serials):
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("the gateway's tokens did not come into the pool within 20 s")
            yield orch, serials
    finally:
        await orch.stop()
        for serial in serials[1:]:
            with contextlib.suppress(softhsm.SoftHsmError):
                softhsm.delete_token(token.conf_path, serial)


def _descriptor(instance, name: str) -> CoreObjectDescriptor:
    return CoreObjectDescriptor.from_dict(instance.process_map[name])


def _states(orch, card_id: str) -> dict[str, str]:
    return {c.id: c.state for c in orch.store.certificates.list(card_id=card_id)}


def _assert_crl_agrees_with_store(orch, card_ids, tmp_path) -> dict[str, str]:
    """Every certificate of the cards: on the CRL with the reason its store state implies, or
    absent when it is Active. Returns id -> state."""
    entries = crl_reasons(orch.cas["corp"].crl_der(), tmp_path)
    states = {}
    for card_id in card_ids:
        for cert in orch.store.certificates.list(card_id=card_id):
            assert entries.get(cert.serial) == CRL_REASON_OF_STATE[cert.state], (cert.serial_hex, cert.state)
            states[cert.id] = cert.state
    return states


def _produce(orch, serial: str):
    return orch.processes.start("produce-employee-card", {"person": PERSON, "pin": PIN})


# --- renew-certificates ---------------------------------------------------------------------------

def test_renewal_of_certificates_found_by_certs_expiring_supersedes_the_old_ones_c1_c2_for_the_new(
        tmp_path, softhsm_token):
    cfg = _config(tmp_path, validity_days=10)
    use_reader(cfg, "produce-employee-card", softhsm_token)
    use_reader(cfg, "renew-certificates", softhsm_token)
    issued_before_write: dict[str, str] = {}
    holder: dict = {}

    async def boundary(name, task_id):
        if name == "after_store" and "orch" in holder:    # C1: committed, the card write not sent yet
            for cert in holder["orch"].store.certificates.list(task_id=task_id):
                issued_before_write[cert.id] = cert.state

    async def body():
        async with _running(tmp_path, softhsm_token, cfg, boundary=boundary) as (orch, _):
            produced = await _produce(orch, softhsm_token.serial)
            card = _descriptor(produced, "card")
            old = _states(orch, card.id)
            within_30 = await asyncio.to_thread(cardline_cli, orch.address, "certs", "expiring", "--days", "30",
                                                "--state", "Active", "--json")
            within_5 = await asyncio.to_thread(cardline_cli, orch.address, "certs", "expiring", "--days", "5", "--json")
            holder["orch"] = orch
            renewed = await orch.processes.start("renew-certificates", {"card": card, "person": PERSON, "pin": PIN,
                                                                        "days": "30"})
            states = _assert_crl_agrees_with_store(orch, [card.id], tmp_path)
            related = {r.target_id for r in orch.store.relations.list(source_id=card.id)}
            return produced, card, old, within_30, within_5, renewed, states, related

    produced, _card, old, within_30, within_5, renewed, states, related = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    assert within_30.returncode == 0, within_30.stderr
    assert {c["id"] for c in json.loads(within_30.stdout)} == set(old)           # both, 10 days left
    assert json.loads(within_5.stdout) == []
    assert renewed.state == "SUCCEEDED", renewed.error_message
    new = {_descriptor(renewed, "renewedAuthentication").id, _descriptor(renewed, "renewedSignature").id}
    assert {states[i] for i in old} == {"Replaced"}                              # superseded, on the CRL
    assert {states[i] for i in new} == {"Active"}                                # C2: start state ...
    assert new <= related                                                        # ... with their relations
    assert {issued_before_write[i] for i in new} == {"Issued"}                   # C1: stored before the write


def test_renewal_whose_card_write_fails_leaves_the_old_certificates_valid_c3_for_the_new(
        tmp_path, softhsm_token):
    cfg = _config(tmp_path, validity_days=10)
    use_reader(cfg, "produce-employee-card", softhsm_token)
    use_reader(cfg, "renew-certificates", softhsm_token)
    pull = {"armed": False}

    async def boundary(name, task_id):
        if name == "after_store" and pull["armed"]:
            raise CardRemoved("test: the card was pulled before the write")

    async def body():
        async with _running(tmp_path, softhsm_token, cfg, boundary=boundary) as (orch, _):
            produced = await _produce(orch, softhsm_token.serial)
            card = _descriptor(produced, "card")
            old = _states(orch, card.id)
            pull["armed"] = True
            renewed = await orch.processes.start("renew-certificates", {"card": card, "person": PERSON, "pin": PIN,
                                                                        "days": "30"})
            states = _assert_crl_agrees_with_store(orch, [card.id], tmp_path)
            new = orch.store.certificates.get(_descriptor(renewed, "renewedAuthentication").id)
            audit = orch.store.audit.list(object_id=new.id)
            return old, renewed, states, new, audit

    old, renewed, states, new, audit = asyncio.run(body())
    assert renewed.state == "FAILED" and renewed.error_reason == "CARD_REMOVED"
    assert {states[i] for i in old} == {"Active"}                                # not superseded, not on the CRL
    assert new.task_error_reason == "CARD_REMOVED"                               # C3: left carrying the error
    moves = [a.detail for a in audit if a.action == "handle_issued" and a.detail.get("step") == "move"]
    assert moves[0]["from"] == "Issued"                                          # C3, then handled (C5)
    assert new.state == "Revoked"


def test_renewal_with_nothing_expiring_fails_before_touching_the_card(tmp_path, softhsm_token):
    cfg = _config(tmp_path)                                                      # 730 days
    use_reader(cfg, "produce-employee-card", softhsm_token)
    use_reader(cfg, "renew-certificates", softhsm_token)

    async def body():
        async with _running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await _produce(orch, softhsm_token.serial)
            card = _descriptor(produced, "card")
            renewed = await orch.processes.start("renew-certificates", {"card": card, "person": PERSON, "pin": PIN,
                                                                        "days": "30"})
            return renewed, orch.store.tasks.list(process_instance_id=renewed.id)

    renewed, tasks = asyncio.run(body())
    assert renewed.state == "FAILED" and renewed.error_reason == "NOT_FOUND"
    assert tasks == []                                                           # no card task ran


# --- replace-card ---------------------------------------------------------------------------------

def test_replace_card_supersedes_the_old_certificates_after_the_new_card_succeeded(tmp_path, softhsm_token):
    cfg = _config(tmp_path)
    use_reader(cfg, "produce-employee-card", softhsm_token)

    async def body():
        async with _running(tmp_path, softhsm_token, cfg, cards=2) as (orch, serials):
            use_reader(cfg, "replace-card", serials[1])
            orch.configuration.processes["replace-card"] = _reload(cfg, orch, "replace-card")
            produced = await _produce(orch, serials[0])
            old_card = _descriptor(produced, "card")
            old = _states(orch, old_card.id)
            replaced = await orch.processes.start("replace-card", {"old_card": old_card, "person": PERSON, "pin": PIN})
            new_card = _descriptor(replaced, "card")
            states = _assert_crl_agrees_with_store(orch, [old_card.id, new_card.id], tmp_path)
            listed = await asyncio.to_thread(cardline_cli, orch.address, "cards", "list", "--holder", PERSON, "--json")
            return old_card, old, replaced, new_card, states, listed, orch.store.cards.get(new_card.id)

    old_card, old, replaced, new_card, states, listed, new_record = asyncio.run(body())
    assert replaced.state == "SUCCEEDED", replaced.error_message
    assert {states[i] for i in old} == {"Replaced"}                              # superseded
    assert [s for i, s in states.items() if i not in old] == ["Active", "Active"]
    assert new_record.holder == PERSON and new_record.state == "Active"
    assert listed.returncode == 0, listed.stderr
    assert [c["id"] for c in json.loads(listed.stdout)] == [old_card.id, new_card.id]   # oldest first


def test_replace_card_keeps_the_old_certificates_valid_when_the_new_card_fails(tmp_path, softhsm_token):
    cfg = _config(tmp_path)
    use_reader(cfg, "produce-employee-card", softhsm_token)
    pull = {"armed": False}

    async def boundary(name, task_id):
        if name == "after_store" and pull["armed"]:
            raise CardRemoved("test: the new card was pulled")

    async def body():
        async with _running(tmp_path, softhsm_token, cfg, cards=2, boundary=boundary) as (orch, serials):
            use_reader(cfg, "replace-card", serials[1])
            orch.configuration.processes["replace-card"] = _reload(cfg, orch, "replace-card")
            produced = await _produce(orch, serials[0])
            old_card = _descriptor(produced, "card")
            old = _states(orch, old_card.id)
            pull["armed"] = True
            replaced = await orch.processes.start("replace-card", {"old_card": old_card, "person": PERSON, "pin": PIN})
            new_card = _descriptor(replaced, "card")
            states = _assert_crl_agrees_with_store(orch, [old_card.id, new_card.id], tmp_path)
            return old, replaced, new_card, states, orch.store.cards.get(new_card.id)

    old, replaced, _new_card, states, new_record = asyncio.run(body())
    assert replaced.state == "FAILED" and replaced.error_reason == "CARD_REMOVED"
    assert {states[i] for i in old} == {"Active"}                                # still valid, not on the CRL
    assert [s for i, s in states.items() if i not in old] == ["Revoked"]          # the new card's, handled
    assert new_record.state == "ProductionFailed"


# --- issue-temporary-card, restore-card -------------------------------------------------------------

def test_temporary_card_holds_the_permanent_certificates_and_restore_releases_them(tmp_path, softhsm_token):
    cfg = _config(tmp_path)
    use_reader(cfg, "produce-employee-card", softhsm_token)

    async def body():
        async with _running(tmp_path, softhsm_token, cfg, cards=2) as (orch, serials):
            use_reader(cfg, "issue-temporary-card", serials[1])
            orch.configuration.processes["issue-temporary-card"] = _reload(cfg, orch, "issue-temporary-card")
            produced = await _produce(orch, serials[0])
            permanent = _descriptor(produced, "card")
            issued = await orch.processes.start("issue-temporary-card", {"permanent_card": permanent,
                                                                         "person": PERSON, "pin": PIN})
            temporary = _descriptor(issued, "card")
            after_issue = _assert_crl_agrees_with_store(orch, [permanent.id, temporary.id], tmp_path)
            temp_cert = orch.store.certificates.get(_descriptor(issued, "temporaryCertificate").id)
            restored = await orch.processes.start("restore-card", {"temporary_card": temporary,
                                                                   "permanent_card": permanent})
            after_restore = _assert_crl_agrees_with_store(orch, [permanent.id, temporary.id], tmp_path)
            return (set(_states(orch, permanent.id)), issued, temp_cert, after_issue, restored, after_restore,
                    crl_reasons(orch.cas["corp"].crl_der(), tmp_path))

    permanent_ids, issued, temp_cert, after_issue, restored, after_restore, crl = asyncio.run(body())
    assert issued.state == "SUCCEEDED", issued.error_message
    assert {after_issue[i] for i in permanent_ids} == {"OnHold"}                 # held at the CA
    assert after_issue[temp_cert.id] == "Active" and temp_cert.ca_name == "corp"
    assert temp_cert.not_after - temp_cert.not_before <= dt.timedelta(days=14, minutes=5)   # short validity
    assert restored.state == "SUCCEEDED", restored.error_message
    assert {after_restore[i] for i in permanent_ids} == {"Active"}               # released: off the CRL
    assert after_restore[temp_cert.id] == "Retired"
    assert crl[temp_cert.serial] == "Cessation Of Operation"


def _reload(cfg, orch, name: str):
    """The process file re-read after the test pointed it at a reader known only at run time."""
    from orchestrator.domain.processes import load_process
    path = cfg / "processes" / f"{name}.yaml"
    return load_process(path.read_text(), str(path))


def test_crl_reason_names_match_what_openssl_prints():
    """The table the agreement checks rely on uses `openssl crl -text`'s spelling."""
    assert all(re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)*", r) for r in CRL_REASON_OF_STATE.values() if r)
