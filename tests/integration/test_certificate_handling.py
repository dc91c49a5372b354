"""C4, C5, C14, C17 on a real store (SQLite and PostgreSQL) and a real local CA:
search and handling of certificates left in the internal issued state, the opt-in sweeper,
change state (in the CA) with the strict mapping."""
from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import update

from orchestrator.ca import IssueProfile, LocalCa
from orchestrator.ca.base import REVOCATION_REASONS
from orchestrator.ca.openssl import OpenSslCa
from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.domain.state_graphs import StateGraph, Transition, load_state_graph, load_state_graphs
from orchestrator.services.certificates import CertificateService
from orchestrator.services.sweeper import IssuedSweeper
from orchestrator.store import Store
from orchestrator.store.models import Certificate
from orchestrator.store.records import TaskState
from shared.errors import CaRefused, IllegalTransition, InvalidArgument, StateConflict, UnmappedCaAction

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "state-graphs"
ISSUED = "Issued"
UTC = dt.UTC
AUTH = "EmployeeAuthentication"     # template -> EmployeeCertificate (examples/state-graphs/certificate.yaml)
LAB = "LabCertificate"              # template -> Lab (below): states mapped by NAME, and one unmapped state

LAB_GRAPH = """
name: Lab
kind: certificate
start: Valid
states:
  Issued: {}
  Valid: {}
  keyCompromise: {final: true}   # an RFC 5280 reason name: passes through (C17)
  Suspended: {}                  # hold-like: certificateHold (C17)
  Lost: {}                       # maps to nothing: change_state_in_ca refuses it (C17)
transitions:
  - {from: Issued, to: Valid}
  - {from: Valid, to: keyCompromise}
  - {from: Valid, to: Suspended}
  - {from: Suspended, to: Valid}
  - {from: Valid, to: Lost}
"""


@pytest.fixture
def graphs() -> dict[str, StateGraph]:
    graphs = load_state_graphs(EXAMPLES)
    graphs["Lab"] = load_state_graph(LAB_GRAPH, "lab.yaml")
    return graphs


@pytest.fixture
def service(store: Store, local_ca: LocalCa, graphs) -> CertificateService:
    of_template = {AUTH: "EmployeeCertificate", LAB: "Lab"}
    return CertificateService(store, {local_ca.name: local_ca}, graphs,
                              lambda template: graphs[of_template[template]], internal_issued_state=ISSUED)


def production(store: Store, gateway: str = "gw1", reader: str = "r1"):
    task = store.tasks.create("card_production", gateway, reader)
    card = store.cards.create(task.id, serial=uuid.uuid4().hex[:8], template="EmployeeCard", state="InProduction",
                             gateway_id=gateway, reader_id=reader)
    return task, card


def issue(store: Store, ca: LocalCa | OpenSslCa, task_id: str, template: str = AUTH, cn: str = "Alice"):
    """A certificate the CA really issued for a CSR, stored in the internal issued state (C1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    profile = IssueProfile(validity_days=30, subject=f"CN={cn}", key_usage=frozenset({"digitalSignature"}))
    der = ca.issue(csr, profile, request_id=str(uuid.uuid4()))
    return store.store_issued_certificate(task_id, der, template=template, ca_name=ca.name, state=ISSUED)


def crl(ca: LocalCa) -> dict[int, str]:
    """serial -> RFC 5280 reason name, from a freshly signed CRL (checked against the CA key)."""
    ca_cert = x509.load_der_x509_certificate(ca.ca_certificate_der())
    crl = x509.load_der_x509_crl(ca.crl_der())
    ca_public_key = ca_cert.public_key()
    assert isinstance(ca_public_key, ec.EllipticCurvePublicKey)   # the local CA's key is EC P-256
    assert crl.is_signature_valid(ca_public_key)
    names = {flag: name for name, flag in REVOCATION_REASONS.items()}
    out = {}
    for entry in crl:
        try:
            out[entry.serial_number] = names[entry.extensions.get_extension_for_class(x509.CRLReason).value.reason]
        except x509.ExtensionNotFound:
            out[entry.serial_number] = "unspecified"
    return out


def backdate(store: Store, cert_id: str, age: dt.timedelta) -> None:
    with store._engine.begin() as conn:
        conn.execute(update(Certificate).where(Certificate.id == cert_id)
                     .values(created_at=dt.datetime.now(UTC) - age))


def audit(store: Store, cert_id: str) -> list[tuple[str, str, dict]]:
    return [(e.action, e.actor, e.detail) for e in store.audit.list(object_id=cert_id)]


def active(store: Store, ca: LocalCa, template: str = AUTH):
    """A certificate whose task succeeded (C2: moved to the start state)."""
    task, _card = production(store)
    cert = issue(store, ca, task.id, template)
    start = "Active" if template == AUTH else "Valid"
    store.finish_task_succeeded(task.id, ISSUED, {cert.id: start}, card_state="Active")
    return store.certificates.get(cert.id)


# --------------------------------------------------------------------------- C17


def test_c17_reason_name_state_passes_through(store, local_ca, service):
    cert = active(store, local_ca, LAB)
    moved = service.change_state_in_ca(cert.id, "keyCompromise", actor="alice")
    assert moved.state == "keyCompromise" and store.certificates.get(cert.id).state == "keyCompromise"
    assert crl(local_ca) == {cert.serial: "keyCompromise"}
    action, actor, detail = audit(store, cert.id)[-1]
    assert (action, actor) == ("change_state_in_ca", "alice")
    assert detail["ca_action"] == "revoke" and detail["ca_reason"] == "keyCompromise"
    assert detail["reason"] is None                                        # no transition reason given
    assert detail["from"] == "Valid" and detail["to"] == "keyCompromise"


def test_c17_hold_state_maps_to_certificate_hold(store, local_ca, service):
    by_name, declared = active(store, local_ca, LAB), active(store, local_ca, AUTH)
    service.change_state_in_ca(by_name.id, "Suspended")                      # hold-like name
    service.change_state_in_ca(declared.id, "OnHold", reason="cardMislaid")  # declared certificateHold
    assert crl(local_ca) == {by_name.serial: "certificateHold", declared.serial: "certificateHold"}
    assert store.certificates.get(by_name.id).state == "Suspended"
    assert store.certificates.get(declared.id).state == "OnHold"


def test_c17_reactivation_lifts_hold(store, local_ca, service):
    by_name, declared = active(store, local_ca, LAB), active(store, local_ca, AUTH)
    service.change_state_in_ca(by_name.id, "Suspended")
    service.change_state_in_ca(declared.id, "OnHold", reason="suspended")
    assert set(crl(local_ca)) == {by_name.serial, declared.serial}

    service.change_state_in_ca(by_name.id, "Valid")      # Valid implies nothing: re-activation (d)
    assert crl(local_ca) == {declared.serial: "certificateHold"}
    service.change_state_in_ca(declared.id, "Active")    # Active declares removeFromCRL (a)
    assert crl(local_ca) == {}
    assert store.certificates.get(by_name.id).state == "Valid"
    assert store.certificates.get(declared.id).state == "Active"
    assert audit(store, declared.id)[-1][2]["ca_action"] == "lift_hold"


def test_c17_unmapped_state_is_error_and_nothing_revoked(store, local_ca, service):
    cert = active(store, local_ca, LAB)
    events = audit(store, cert.id)
    with pytest.raises(UnmappedCaAction, match=r"'Lost' maps to no CA action.*keyCompromise \(keyCompromise\), "
                                               r"Suspended \(certificateHold\)"):
        service.change_state_in_ca(cert.id, "Lost")
    assert crl(local_ca) == {}
    assert store.certificates.get(cert.id).state == "Valid"
    assert audit(store, cert.id) == events

    # A typo is not a state: refused by the graph before the table is even consulted.
    example = active(store, local_ca, AUTH)
    with pytest.raises(IllegalTransition, match=r"unknown state 'Revokd' \(did you mean 'Revoked'\?\)"):
        service.change_state_in_ca(example.id, "Revokd", reason="keyCompromise")
    assert crl(local_ca) == {}
    assert store.certificates.get(example.id).state == "Active"

    # The same state without the CA is a plain state change.
    assert service.change_state(cert.id, "Lost").state == "Lost"
    assert crl(local_ca) == {}


def test_c17_change_state_in_ca_revokes_at_ca_and_moves_store_state(store, local_ca, service):
    cert = active(store, local_ca, AUTH)
    moved = service.change_state_in_ca(cert.id, "Revoked", reason="cardStolen", actor="helpdesk")
    assert moved.state == "Revoked"
    assert crl(local_ca) == {cert.serial: "keyCompromise"}   # Revoked declares ca_action keyCompromise
    action, actor, detail = audit(store, cert.id)[-1]
    assert (action, actor) == ("change_state_in_ca", "helpdesk")
    assert detail["from"] == "Active" and detail["to"] == "Revoked" and detail["reason"] == "cardStolen"
    assert detail["ca_action"] == "revoke" and detail["ca_reason"] == "keyCompromise" and detail["ca"] == local_ca.name
    assert detail["serial_hex"] == cert.serial_hex

    # A move the graph does not allow is refused before the CA is asked.
    other = active(store, local_ca, AUTH)
    with pytest.raises(IllegalTransition, match="needs one of the reasons"):
        service.change_state_in_ca(other.id, "Revoked")
    assert other.serial not in crl(local_ca)

    # The CA says no (revoked for good out of band): the store state does not change, and the
    # failure is audited.
    local_ca.revoke(other.serial, "superseded")
    with pytest.raises(CaRefused, match="already revoked"):
        service.change_state_in_ca(other.id, "OnHold", reason="suspended", actor="helpdesk")
    assert store.certificates.get(other.id).state == "Active"
    action, actor, detail = audit(store, other.id)[-1]
    assert (action, actor) == ("change_state_in_ca_failed", "helpdesk")
    assert detail["ca_done"] is False and detail["error_reason"] == "CA_REFUSED" and detail["state"] == "Active"
    assert detail["to"] == "OnHold"


# --------------------------------------------------------------------------- C14


def test_c14_issued_state_left_only_to_start_state(store, local_ca, service, graphs):
    task, _card = production(store)
    cert = issue(store, local_ca, task.id)
    store.finish_task_failed(task.id, "CARD_REMOVED", "card pulled")
    for target, reason in (("Revoked", "keyCompromise"), ("OnHold", "suspended"), ("Replaced", None)):
        with pytest.raises(IllegalTransition, match="can only be left to the start state 'Active'"):
            service.change_state(cert.id, target, reason=reason)
        with pytest.raises(IllegalTransition, match="can only be left to the start state 'Active'"):
            service.change_state_in_ca(cert.id, target, reason=reason)
    assert store.certificates.get(cert.id).state == ISSUED and crl(local_ca) == {}

    moved = service.change_state(cert.id, "Active", actor="operator")
    assert moved.state == "Active"
    assert audit(store, cert.id)[-1][:2] == ("change_state", "operator")
    with pytest.raises(IllegalTransition, match="nothing moves into the internal issued state"):
        service.change_state(cert.id, ISSUED)

    # Even a graph that (wrongly) leads elsewhere out of Issued does not open another way out.
    g = graphs["EmployeeCertificate"]
    loose = StateGraph(g.name, g.kind, g.start, g.states,
                       (*g.transitions, Transition(ISSUED, "Replaced")))
    loose_service = CertificateService(store, {local_ca.name: local_ca}, {g.name: loose}, lambda t: loose)
    stuck = issue(store, local_ca, store.tasks.create("card_operation", "gw1", "r1").id)
    with pytest.raises(IllegalTransition, match="can only be left to the start state"):
        loose_service.change_state(stuck.id, "Replaced")
    assert store.certificates.get(stuck.id).state == ISSUED


# --------------------------------------------------------------------------- C4


def test_c4_search_issued_by_age_template_card_task_carries_task_error(store, local_ca, service):
    failed, card = production(store, gateway="gw-a", reader="r-a")
    old = issue(store, local_ca, failed.id, AUTH, cn="Old")
    young = issue(store, local_ca, failed.id, LAB, cn="Young")
    store.finish_task_failed(failed.id, "WRITE_REFUSED", "the card refused the certificate")
    running = store.tasks.create("card_operation", "gw-b", "r-b")
    pending = issue(store, local_ca, running.id, AUTH, cn="Pending")
    done = active(store, local_ca)                       # in its start state: never a hit
    backdate(store, old.id, dt.timedelta(hours=5))
    backdate(store, pending.id, dt.timedelta(hours=3))

    def ids(**kw):
        return [h.id for h in service.search_issued(**kw)]

    assert ids() == [old.id, pending.id, young.id]       # oldest first
    assert done.id not in ids()
    assert ids(older_than=dt.timedelta(hours=2)) == [old.id, pending.id]
    assert ids(older_than=dt.timedelta(hours=4)) == [old.id]
    assert ids(older_than=dt.timedelta(hours=4), now=dt.datetime.now(UTC) + dt.timedelta(hours=2)) == \
        [old.id, pending.id]
    assert ids(template=LAB) == [young.id]
    assert ids(card_id=card.id) == [old.id, young.id]
    assert ids(task_id=running.id) == [pending.id]
    assert ids(gateway_id="gw-b") == [pending.id]
    assert ids(reader_id="r-a", template=AUTH) == [old.id]
    assert ids(limit=1) == [old.id]
    with pytest.raises(InvalidArgument):
        service.search_issued(older_than=dt.timedelta(hours=-1))

    hit = service.search_issued(template=AUTH, card_id=card.id)[0]
    assert hit.descriptor == CoreObjectDescriptor("Certificate", AUTH, old.id)
    assert hit.serial_hex == old.serial_hex and hit.issuer == old.issuer and "CN=cardline test-local CA" in hit.issuer
    assert hit.subject == "CN=Old" and hit.task_id == failed.id and hit.ca_name == local_ca.name
    assert (hit.task_error_reason, hit.task_error_message) == ("WRITE_REFUSED", "the card refused the certificate")
    still = service.search_issued(task_id=running.id)[0]
    assert (still.task_error_reason, still.task_error_message) == (None, None)   # its task has not failed


# --------------------------------------------------------------------------- C5


def test_c5_no_automatic_handling_by_default(store, local_ca, service):
    task, _card = production(store)
    cert = issue(store, local_ca, task.id)
    store.finish_task_failed(task.id, "CARD_REMOVED", "card pulled")
    backdate(store, cert.id, dt.timedelta(days=30))
    # Nothing runs by itself: the service does nothing until called, there is no sweeper
    # unless one is constructed with an explicit grace period, reason and target state.
    CertificateService(store, {local_ca.name: local_ca}, {}, lambda t: t)
    with pytest.raises(TypeError):
        IssuedSweeper(service)   # type: ignore[call-arg]  # no defaults that could act on their own
    with pytest.raises(InvalidArgument, match="target_state is required"):
        IssuedSweeper(service, grace_period=dt.timedelta(hours=1), revoke_reason="superseded", target_state=None)
    assert store.certificates.get(cert.id).state == ISSUED
    assert crl(local_ca) == {}
    assert store.audit.list(object_id=cert.id) == []
    assert [h.id for h in service.search_issued()] == [cert.id]


def test_c5_handle_issued_revokes_and_moves_with_audit(store, local_ca, service):
    task, _card = production(store)
    a = issue(store, local_ca, task.id, cn="A")
    b = issue(store, local_ca, task.id, cn="B")
    store.finish_task_failed(task.id, "CARD_REMOVED", "card pulled")
    running = store.tasks.create("card_operation", "gw1", "r1")
    in_flight = issue(store, local_ca, running.id, cn="InFlight")
    done = active(store, local_ca)

    # A bad reason is refused before anything happens.
    with pytest.raises(InvalidArgument, match="unknown revocation reason 'keycompromise'"):
        service.handle_issued([a.id], revoke_reason="keycompromise", target_state="Retired", actor="p")
    with pytest.raises(InvalidArgument):
        service.handle_issued([a.id], revoke_reason=None, target_state=None, actor="p")
    assert crl(local_ca) == {} and store.certificates.get(a.id).state == ISSUED

    results = service.handle_issued([a.id, b.id, in_flight.id, done.id, "no-such-id"],
                                    revoke_reason="cessationOfOperation", target_state="Retired",
                                    transition_reason="cardDestroyed", actor="process:produce-employee-card")
    by_id = {r.certificate_id: r for r in results}
    for cert in (a, b):
        r = by_id[cert.id]
        assert (r.revoked, r.state, r.error, r.skipped, r.serial_hex) == (True, "Retired", None, None, cert.serial_hex)
        assert store.certificates.get(cert.id).state == "Retired"
        events = audit(store, cert.id)
        # C16: the intent first (what the reconciler finishes after a crash), then the handling.
        intent = events.pop(0)
        assert intent[:2] == ("ca_handling_intent", "process:produce-employee-card")
        assert intent[2]["moves"] == [[ISSUED, "Active", None], ["Active", "Retired", "cardDestroyed"]]
        assert [(e[0], e[1]) for e in events] == [("handle_issued", "process:produce-employee-card")] * 3
        assert events[0][2]["step"] == "revoke" and events[0][2]["ca_reason"] == "cessationOfOperation"
        assert (events[1][2]["from"], events[1][2]["to"]) == (ISSUED, "Active")
        assert (events[2][2]["from"], events[2][2]["to"], events[2][2]["reason"]) == ("Active", "Retired",
                                                                                       "cardDestroyed")
    assert "still running" in by_id[in_flight.id].skipped and not by_id[in_flight.id].revoked
    assert "not in the internal issued state" in by_id[done.id].skipped
    assert "NOT_FOUND" in by_id["no-such-id"].error
    assert crl(local_ca) == {a.serial: "cessationOfOperation", b.serial: "cessationOfOperation"}
    assert store.certificates.get(in_flight.id).state == ISSUED and store.certificates.get(done.id).state == "Active"

    # One certificate's failure does not stop the others; an illegal target revokes nothing.
    t2, _ = production(store)
    c, d = issue(store, local_ca, t2.id, cn="C"), issue(store, local_ca, t2.id, cn="D")
    e = issue(store, local_ca, t2.id, LAB, cn="E")
    store.finish_task_failed(t2.id, "CARD_REMOVED", "card pulled")
    local_ca.revoke(c.serial, "keyCompromise")          # the CA will refuse another revocation of c
    results = {r.certificate_id: r for r in service.handle_issued(
        None, revoke_reason="superseded", target_state="Replaced", actor="operator")}
    assert set(results) == {c.id, d.id, e.id, in_flight.id}   # None: every certificate still in Issued
    assert "CA_REFUSED" in results[c.id].error and results[c.id].state == ISSUED and not results[c.id].revoked
    assert audit(store, c.id)[-1][0] == "handle_issued_failed"
    assert results[d.id].handled and results[d.id].state == "Replaced"
    assert "ILLEGAL_TRANSITION" in results[e.id].error and not results[e.id].revoked   # Lab has no Replaced
    assert e.serial not in crl(local_ca) and store.certificates.get(e.id).state == ISSUED
    assert results[in_flight.id].skipped

    # With only_finished_tasks=False a running task's certificate is handled too (explicit call).
    r = service.handle_issued([in_flight.id], revoke_reason=None, target_state="Active", actor="operator",
                              only_finished_tasks=False)[0]
    assert r.handled and r.state == "Active" and not r.revoked


def test_c5_handle_issued_interrupted_between_its_moves_never_leaves_a_revoked_certificate_active(
        store, local_ca, service, monkeypatch):
    # Before: Issued -> Active and Active -> Retired were two transactions; an interruption
    # after the first left a revoked, never-written certificate Active (and out of reach of
    # the C4 search, so nothing would handle it again).
    task, _card = production(store)
    cert = issue(store, local_ca, task.id)
    store.finish_task_failed(task.id, "CARD_REMOVED", "card pulled")
    from orchestrator.store import rows
    real_add_audit = rows.add_audit

    def interrupted(session, action, object_type, object_id, actor, detail, at, *subjects):
        if detail and detail.get("to") == "Retired":
            raise ConnectionError("the database went away between the two moves")
        return real_add_audit(session, action, object_type, object_id, actor, detail, at, *subjects)

    monkeypatch.setattr(rows, "add_audit", interrupted)
    result = service.handle_issued([cert.id], revoke_reason="cessationOfOperation", target_state="Retired",
                                   transition_reason="cardDestroyed", actor="operator")[0]
    monkeypatch.setattr(rows, "add_audit", real_add_audit)
    assert result.revoked and "ConnectionError" in result.error
    assert crl(local_ca) == {cert.serial: "cessationOfOperation"}
    assert store.certificates.get(cert.id).state == ISSUED          # not Active: the path is all or nothing
    assert [h.id for h in service.search_issued()] == [cert.id]     # so it is found and handled again
    again = service.handle_issued([cert.id], revoke_reason="cessationOfOperation", target_state="Retired",
                                  transition_reason="cardDestroyed", actor="operator")[0]
    assert again.handled and store.certificates.get(cert.id).state == "Retired"


def test_c5_sweeper_skips_running_tasks_and_young_certificates(store, local_ca, service):
    failed, _card = production(store)
    old_failed = issue(store, local_ca, failed.id, cn="OldFailed")
    young_failed = issue(store, local_ca, failed.id, cn="YoungFailed")
    store.finish_task_failed(failed.id, "CARD_REMOVED", "card pulled")
    running = store.tasks.create("card_operation", "gw1", "r1")
    old_running = issue(store, local_ca, running.id, cn="OldRunning")
    for cert in (old_failed, old_running):
        backdate(store, cert.id, dt.timedelta(hours=2))

    sweeper = IssuedSweeper(service, grace_period=dt.timedelta(hours=1), revoke_reason="cessationOfOperation",
                            target_state="Retired", transition_reason="cardDestroyed", interval_s=0.05)
    results = {r.certificate_id: r for r in sweeper.sweep_once()}
    assert set(results) == {old_failed.id, old_running.id}            # young_failed not even looked at
    assert results[old_failed.id].handled and results[old_failed.id].state == "Retired"
    assert "still running" in (results[old_running.id].skipped or "")
    assert crl(local_ca) == {old_failed.serial: "cessationOfOperation"}
    assert store.certificates.get(old_running.id).state == ISSUED
    assert store.tasks.get(running.id).state == TaskState.RUNNING
    assert store.certificates.get(young_failed.id).state == ISSUED
    assert {e.actor for e in store.audit.list(object_id=old_failed.id)} == {"sweeper"}
    assert store.audit.list(object_id=old_running.id) == [] and store.audit.list(object_id=young_failed.id) == []

    # A second sweep finds nothing new to do; the young one is handled once it is old enough.
    assert [r for r in sweeper.sweep_once() if r.handled] == []
    later = dt.datetime.now(UTC) + dt.timedelta(hours=1, minutes=1)
    assert [r.certificate_id for r in sweeper.sweep_once(now=later) if r.handled] == [young_failed.id]

    # run_forever sweeps on its own once started (and only then), until stopped.
    store.finish_task_failed(running.id, "STEP_TIMEOUT", "gateway went away")

    async def run() -> None:
        loop_task = asyncio.create_task(sweeper.run_forever())
        for _ in range(200):
            await asyncio.sleep(0.05)
            if (await asyncio.to_thread(store.certificates.get, old_running.id)).state == "Retired":
                break
        sweeper.stop()
        await asyncio.wait_for(loop_task, 5)

    asyncio.run(run())
    assert store.certificates.get(old_running.id).state == "Retired"
    assert crl(local_ca)[old_running.serial] == "cessationOfOperation"


def test_sweeper_configuration_is_checked(service):
    with pytest.raises(InvalidArgument) as err:
        IssuedSweeper(service, grace_period=dt.timedelta(0), revoke_reason="removeFromCRL", target_state=ISSUED,
                      interval_s=0)
    message = str(err.value)
    for part in ("grace_period must be a positive", "removeFromCRL lifts a hold", "is the internal issued state",
                 "interval_s must be positive"):
        assert part in message
    with pytest.raises(InvalidArgument, match="unknown revocation reason"):
        IssuedSweeper(service, grace_period=dt.timedelta(hours=1), revoke_reason="Superseded", target_state="Active")


def test_c17_concurrent_change_after_ca_action_is_audited(store, local_ca, graphs):
    """The state changes under us between the CA call and the store write: the store
    refuses (StateConflict) and an audit event says the CA has already acted."""
    cert = active(store, local_ca)

    class RacingCa:        # the real local CA; someone else moves the certificate meanwhile
        name = local_ca.name

        def revoke(self, serial: int, reason: str) -> None:
            local_ca.revoke(serial, reason)
            store.certificates.change_state(cert.id, "Replaced", from_state="Active", actor="someone",
                                           action="change_state")

    racing = CertificateService(store, {local_ca.name: RacingCa()}, graphs,  # type: ignore[dict-item]  # revoke only
                                lambda t: graphs["EmployeeCertificate"])
    with pytest.raises(StateConflict):
        racing.change_state_in_ca(cert.id, "OnHold", reason="suspended", actor="helpdesk")
    assert store.certificates.get(cert.id).state == "Replaced"
    action, actor, detail = audit(store, cert.id)[-1]
    assert (action, actor, detail["ca_done"], detail["error_reason"]) == \
        ("change_state_in_ca_failed", "helpdesk", True, "STATE_CONFLICT")
    assert crl(local_ca) == {cert.serial: "certificateHold"}


def test_c17_the_transition_reason_is_the_reason_the_ca_publishes(store, local_ca, service, tmp_path):
    # Before: Revoked declares keyCompromise, and `Revoked --reason cessationOfOperation`
    # published keyCompromise. The transition's RFC 5280 reason is what the CA must publish.
    from tests.support.crl import openssl_crl_reasons
    openssl_ca = OpenSslCa(tmp_path / "openssl-ca", name="openssl")
    service.cas[openssl_ca.name] = openssl_ca
    for ca in (local_ca, openssl_ca):
        task, _card = production(store)
        retired, lost, other = (issue(store, ca, task.id, cn=cn) for cn in ("Retired", "Lost", "Other"))
        store.finish_task_succeeded(task.id, ISSUED, {c.id: "Active" for c in (retired, lost, other)},
                                    card_state="Active")
        service.change_state_in_ca(retired.id, "Revoked", reason="cessationOfOperation", actor="operator")
        service.change_state_in_ca(lost.id, "Revoked", reason="cardLost", actor="operator")   # not an RFC name
        service.change_state_in_ca(other.id, "OnHold", reason="suspended", actor="operator")
        assert openssl_crl_reasons(ca) == {retired.serial: "cessationOfOperation", lost.serial: "keyCompromise",
                                           other.serial: "certificateHold"}, ca.name
        assert audit(store, retired.id)[-1][2]["ca_reason"] == "cessationOfOperation"
        assert {store.certificates.get(c.id).state for c in (retired, lost)} == {"Revoked"}
