"""C1–C3 (and C4's task error, C8's card object) on card productions run by the card task
service against a fake gateway: when a certificate is stored, where it ends on success, and
where it stays when the task fails — whichever part failed."""
from __future__ import annotations

import asyncio
import shutil

from shared import cards
from shared.errors import CardIoError, WriteRefused
from tests.rules.rig import ISSUED, START, rule_orchestrator

AUTH, SIGN = "EmployeeAuthentication", "EmployeeSignature"


def produce(tmp_path, *templates, boundary=None, before=None):
    """Runs one production; BEFORE(rig) may arm faults first. Returns (rig, outcome)."""
    async def body():
        async with rule_orchestrator(tmp_path, boundary=boundary) as rig:
            if before:
                before(rig)
            return rig, await rig.produce(*templates)

    return asyncio.run(body())


def test_c1_certificate_committed_as_issued_before_the_card_write(tmp_path):
    seen = []

    async def hook(name, task_id):
        if name == "after_store":
            rig = holder["rig"]
            seen.append(([c.state for c in rig.certificates(task_id=task_id)],
                         len(rig.token.certificates), len(rig.gateway.operations(cards.WriteCertificates))))

    holder: dict = {}

    async def body():
        async with rule_orchestrator(tmp_path, boundary=hook) as rig:
            holder["rig"] = rig
            return rig, await rig.produce(AUTH, SIGN)

    _rig, outcome = asyncio.run(body())
    assert outcome.task.state == "SUCCEEDED"
    # At each boundary the newest certificate is in the store as Issued; the gateway has not
    # been asked to write it, and the token does not hold it.
    assert seen == [([ISSUED], 0, 0), ([ISSUED, ISSUED], 1, 1)]


def test_c1_certificate_stored_although_the_card_then_refuses_it(tmp_path):
    def refuse(rig):
        rig.gateway.fail(WriteRefused("token full"), operation=cards.WriteCertificates)

    rig, outcome = produce(tmp_path, AUTH, before=refuse)
    assert outcome.task.state == "FAILED"
    [cert] = rig.certificates(task_id=outcome.task.id)
    assert cert.state == ISSUED
    [request] = rig.ca_requests(outcome.task.id)
    assert (request.state, request.certificate_id) == ("stored", cert.id)     # stored, never written


def test_c2_success_moves_every_certificate_to_start_state_with_card_relations(tmp_path):
    rig, outcome = produce(tmp_path, AUTH, SIGN)
    task = outcome.task
    certs = rig.certificates(task_id=task.id)
    assert task.state == "SUCCEEDED"
    assert [c.state for c in certs] == [START, START]
    assert sorted(r.target_id for r in rig.relations(card_id=task.card_id)) == sorted(c.id for c in certs)
    assert rig.card(task.card_id).state == "Active"


def test_c2_success_leaves_each_certificate_on_the_token_next_to_its_key(tmp_path):
    rig, outcome = produce(tmp_path, AUTH, SIGN)
    on_token = {c.der for c in rig.token.certificates.values()}
    assert on_token == {c.der for c in rig.certificates(task_id=outcome.task.id)}
    assert set(rig.token.certificates) <= set(rig.token.keys)      # each under the id of its key


def test_c2_nothing_leaves_the_issued_state_before_the_whole_task_ends(tmp_path):
    seen = []

    async def hook(name, task_id):
        if name == "before_finish":
            seen.append({c.state for c in holder["rig"].certificates(task_id=task_id)})

    holder: dict = {}

    async def body():
        async with rule_orchestrator(tmp_path, boundary=hook) as rig:
            holder["rig"] = rig
            return await rig.produce(AUTH, SIGN)

    outcome = asyncio.run(body())
    assert outcome.task.state == "SUCCEEDED"
    assert seen == [{ISSUED}]


def test_c3_card_lost_after_issuance_leaves_certificates_issued(tmp_path):
    stored = []

    async def hook(name, task_id):
        if name == "after_store":
            stored.append(task_id)
            if len(stored) == 2:     # the second certificate is stored; the card goes before it is written
                holder["rig"].token.lose()

    holder: dict = {}

    async def body():
        async with rule_orchestrator(tmp_path, boundary=hook) as rig:
            holder["rig"] = rig
            return rig, await rig.produce(AUTH, SIGN)

    rig, outcome = asyncio.run(body())
    task = outcome.task
    assert (task.state, task.error_reason) == ("FAILED", "CARD_REMOVED")
    certs = rig.certificates(task_id=task.id)
    assert [c.state for c in certs] == [ISSUED, ISSUED]                    # C3
    assert {c.task_error_reason for c in certs} == {"CARD_REMOVED"}       # C4: each carries the error
    assert rig.relations(card_id=task.card_id) == []                      # C10 default: none on failure
    assert rig.card(task.card_id).state == "ProductionFailed"
    assert len(rig.token.certificates) == 1                               # the first one was written


def test_c3_write_refused_after_issuance_leaves_certificate_issued_and_off_the_token(tmp_path):
    def refuse(rig):
        rig.gateway.fail(WriteRefused("the token refused the certificate"), operation=cards.WriteCertificates)

    rig, outcome = produce(tmp_path, AUTH, before=refuse)
    assert (outcome.task.state, outcome.task.error_reason) == ("FAILED", "WRITE_REFUSED")
    assert outcome.task.error_message == "the token refused the certificate"     # intact across the link
    assert [c.state for c in rig.certificates(task_id=outcome.task.id)] == [ISSUED]
    assert rig.token.certificates == {}


def test_c3_card_refusing_every_write_fails_before_any_certificate_exists(tmp_path):
    rig, outcome = produce(tmp_path, AUTH, before=lambda rig: setattr(rig.token, "refuse_writes", True))
    assert (outcome.task.state, outcome.task.error_reason) == ("FAILED", "WRITE_REFUSED")
    assert rig.certificates(task_id=outcome.task.id) == []       # no key, no CSR, no CA request
    assert rig.issued_by_ca() == {}


def test_c3_failure_in_a_later_application_leaves_the_earlier_certificate_issued(tmp_path):
    def break_second_key(rig):
        rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.GenerateKeyPair, occurrence=2)

    rig, outcome = produce(tmp_path, AUTH, SIGN, before=break_second_key)
    task = outcome.task
    assert (task.state, task.error_reason) == ("FAILED", "CARD_IO")
    [cert] = rig.certificates(task_id=task.id)
    assert (cert.template, cert.state) == (AUTH, ISSUED)
    assert [c.der for c in rig.token.certificates.values()] == [cert.der]    # written, yet not Active
    assert len(rig.ca_requests(task.id)) == 1                                # the second was never asked


def test_c3_ca_failing_the_request_fails_the_task_and_stores_nothing(tmp_path):
    """The CA cannot record the issuance (its record directory is gone): it hands out no
    certificate, the task fails with the CA's reason, the store holds nothing of it."""
    async def hook(name, task_id):
        if name == "before_issue":
            shutil.rmtree(holder["rig"].orch.settings.data_dir / "ca" / "requests")

    holder: dict = {}

    async def body():
        async with rule_orchestrator(tmp_path, boundary=hook) as rig:
            holder["rig"] = rig
            return rig, await rig.produce(AUTH)

    rig, outcome = asyncio.run(body())
    task = outcome.task
    assert (task.state, task.error_reason) == ("FAILED", "CA_UNAVAILABLE")
    assert rig.certificates(task_id=task.id) == []
    assert rig.relations(card_id=task.card_id) == []
    assert rig.card(task.card_id).state == "ProductionFailed"
    assert rig.token.certificates == {} and len(rig.token.keys) == 1      # the key stays, no certificate


def test_c3_wrong_pin_fails_the_task_before_the_ca_is_asked(tmp_path):
    rig, outcome = produce(tmp_path, AUTH, before=lambda rig: setattr(rig.token, "user_pin", "999999"))
    assert (outcome.task.state, outcome.task.error_reason) == ("FAILED", "PIN_INCORRECT")
    assert rig.certificates(task_id=outcome.task.id) == [] and rig.issued_by_ca() == {}


def test_c8_production_creates_one_card_object_with_the_token_serial(tmp_path):
    rig, outcome = produce(tmp_path, AUTH)
    card = rig.card(outcome.task.card_id)
    assert card.serial == rig.token.serial and card.template == "EmployeeCard"
    assert outcome.card.id == card.id and rig.card_count() == 1


def test_c8_production_whose_card_cannot_be_read_creates_no_card_object(tmp_path):
    def unreadable(rig):
        rig.gateway.fail(CardIoError("no answer to reset"), step_number=1)      # read_card_info

    rig, outcome = produce(tmp_path, AUTH, before=unreadable)
    assert (outcome.task.state, outcome.task.error_reason) == ("FAILED", "CARD_IO")
    assert outcome.task.card_id is None and outcome.card is None and rig.card_count() == 0
    assert rig.certificates(task_id=outcome.task.id) == [] and rig.issued_by_ca() == {}
    assert [type(op) for op in rig.gateway.operations()] == [cards.ReadCardInfo]
