"""The store on SQLite and PostgreSQL: migrations, and rules C1-C4 as transaction boundaries."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.store import CARD, CERTIFICATE, DuplicateCertificate, NewRelation, StateConflict, Store, TaskState
from orchestrator.store.models import Base
from orchestrator.store.store import head_revision
from shared.errors import InvalidArgument, NotFound

ISSUED = "Issued"
UTC = dt.UTC
_CA_KEY = ec.generate_private_key(ec.SECP256R1())


def make_cert(serial: int | None = None, issuer_cn: str = "Store Test CA", subject_cn: str = "Alice") -> bytes:
    """A DER certificate signed by a throwaway CA key (the store only parses it)."""
    now = dt.datetime.now(UTC).replace(microsecond=0)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline, test"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
            .public_key(key.public_key())
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .sign(_CA_KEY, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def production(store: Store, gateway: str = "gw1", reader: str = "r1", template: str = "EmployeeCard"):
    task = store.tasks.create("card_production", gateway, reader)
    card = store.cards.create(task.id, serial="0815", template=template, state="Produced",
                             gateway_id=gateway, reader_id=reader)
    return task, card


def test_migrations_reach_head_and_match_models(store: Store):
    assert store.schema_revision() == head_revision()
    store.migrate()   # idempotent: a second start changes nothing
    assert store.schema_revision() == head_revision()
    with store._engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_migrate_works_without_alembic_ini_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no alembic.ini, no repo root: the package finds its migrations
    store = Store(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    store.migrate()
    assert store.schema_revision() == head_revision()
    store.close()


def test_c1_issued_certificate_committed_in_own_transaction(store: Store):
    task, _card = production(store)
    der = make_cert(serial=0x00AB_CDEF)
    cert = store.store_issued_certificate(task.id, der, template="EmployeeAuth", ca_name="local", state=ISSUED)

    # Committed: a second, independent Store (its own engine and connections) sees it while
    # the task is still running - i.e. before the gateway is asked to write anything.
    other = Store(store.database_url)
    try:
        seen = other.certificates.get(cert.id)
    finally:
        other.close()
    assert store.tasks.get(task.id).state == TaskState.RUNNING
    assert seen == cert
    assert seen.state == ISSUED and seen.task_id == task.id and seen.der == der
    assert seen.serial_hex == "abcdef" and seen.serial == 0xABCDEF
    assert seen.issuer == "CN=Store Test CA,O=cardline\\, test"
    assert seen.subject == "CN=Alice"
    assert seen.not_before.tzinfo is not None and seen.not_before.utcoffset() == dt.timedelta(0)
    assert seen.task_error_reason is None


def test_duplicate_issuer_and_serial_rejected_and_nothing_written(store: Store):
    task = store.tasks.create("card_operation", "gw1", "r1")
    der = make_cert(serial=4711)
    first = store.store_issued_certificate(task.id, der, "T", "local", ISSUED)
    another_task = store.tasks.create("card_operation", "gw1", "r1")
    with pytest.raises(DuplicateCertificate, match="already stored") as err:
        store.store_issued_certificate(another_task.id, make_cert(serial=4711), "T", "local", ISSUED)
    assert err.value.metadata["certificate_id"] == first.id
    assert [c.id for c in store.certificates.list()] == [first.id]
    # Same serial from another issuer is a different certificate.
    store.store_issued_certificate(another_task.id, make_cert(serial=4711, issuer_cn="Other CA"), "T", "local", ISSUED)
    assert len(store.certificates.list()) == 2


def test_not_a_certificate_rejected(store: Store):
    task = store.tasks.create("card_operation", "gw1", "r1")
    with pytest.raises(InvalidArgument, match=r"not a DER X\.509 certificate"):
        store.store_issued_certificate(task.id, b"\x30\x03junk", "T", "local", ISSUED)
    assert store.certificates.list() == []


def test_c2_success_moves_certificates_relations_and_task_atomically(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)

    done = store.finish_task_succeeded(
        task.id, from_state=ISSUED, certificate_states={a.id: "Active", b.id: "Hold"}, card_state="Active",
        relations=[NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A"),
                   NewRelation(CARD, card.id, CERTIFICATE, b.id, "OWNS")])

    assert done.state == TaskState.SUCCEEDED and done.finished_at is not None and done.card_id == card.id
    assert store.certificates.get(a.id).state == "Active"
    assert store.certificates.get(b.id).state == "Hold"
    assert store.cards.get(card.id).state == "Active"
    rels = store.relations.list(source_id=card.id)
    assert {(r.target_id, r.relation_type, r.task_id) for r in rels} == {(a.id, "HAS_A", task.id),
                                                                        (b.id, "OWNS", task.id)}
    assert store.cards.certificate_ids(card.id) == [a.id, b.id]
    assert store.relations.list(target_id=b.id)[0].source_type == CARD


def test_page_reads_answer_in_one_query_what_the_single_reads_answer(store: Store):
    """The batch reads a List RPC uses for a page agree with the per-object reads."""
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    lone_task, lone_card = production(store)
    store.finish_task_succeeded(task.id, from_state=ISSUED, certificate_states={a.id: "Active", b.id: "Active"},
                                card_state="Active",
                                relations=[NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A"),
                                           NewRelation(CARD, card.id, CERTIFICATE, b.id, "HAS_A")])

    assert store.cards.certificate_ids_of([card.id, lone_card.id]) == {
        card.id: store.cards.certificate_ids(card.id), lone_card.id: []}
    assert store.cards.certificate_ids_of([card.id])[card.id] == [a.id, b.id]
    assert store.certificates.ids_by_task([task.id, lone_task.id]) == {
        task.id: [c.id for c in store.certificates.list(task_id=task.id)], lone_task.id: []}
    assert store.relations.cards_of([a.id, b.id]) == {a.id: card.id, b.id: card.id}
    assert store.relations.cards_of([]) == {} and store.cards.certificate_ids_of([]) == {}


def test_c2_failure_inside_the_finish_changes_nothing(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    rel_a = NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A")

    # The last write of the transaction fails (the same relation twice violates the unique
    # constraint) after the certificates and the card were already changed in it.
    with pytest.raises(StateConflict, match="relation"):
        store.finish_task_succeeded(task.id, ISSUED, {a.id: "Active", b.id: "Active"}, "Active",
                                    [rel_a, rel_a])

    assert store.certificates.get(a.id).state == ISSUED
    assert store.certificates.get(b.id).state == ISSUED
    assert store.cards.get(card.id).state == "Produced"
    assert store.relations.list() == []
    assert store.tasks.get(task.id).state == TaskState.RUNNING and store.tasks.get(task.id).finished_at is None

    # The task can still end properly afterwards.
    store.finish_task_succeeded(task.id, ISSUED, {a.id: "Active", b.id: "Active"}, "Active", [rel_a])
    assert store.certificates.get(b.id).state == "Active"


def test_c2_guards_refuse_foreign_moved_or_forgotten_certificates(store: Store):
    task, card = production(store)
    other_task = store.tasks.create("card_operation", "gw2", "r9")
    mine = store.store_issued_certificate(task.id, make_cert(), "T", "local", ISSUED)
    second = store.store_issued_certificate(task.id, make_cert(), "T", "local", ISSUED)
    theirs = store.store_issued_certificate(other_task.id, make_cert(), "T", "local", ISSUED)

    with pytest.raises(InvalidArgument, match="did not issue"):
        store.finish_task_succeeded(task.id, ISSUED, {mine.id: "Active", second.id: "Active",
                                                      theirs.id: "Active"}, None, [])
    with pytest.raises(StateConflict, match="not in the internal issued state 'Pending'"):
        store.finish_task_succeeded(task.id, "Pending", {mine.id: "Active", second.id: "Active"}, None, [])
    with pytest.raises(InvalidArgument, match="every certificate of a successful task moves"):
        store.finish_task_succeeded(task.id, ISSUED, {mine.id: "Active"}, None, [])
    with pytest.raises(NotFound, match="no Certificate"):
        store.finish_task_succeeded(task.id, ISSUED, {mine.id: "Active", second.id: "Active"}, None,
                                    [NewRelation(CARD, card.id, CERTIFICATE, "no-such-id", "HAS_A")])
    assert {c.state for c in store.certificates.list()} == {ISSUED}
    assert store.tasks.get(task.id).state == TaskState.RUNNING

    store.finish_task_succeeded(task.id, ISSUED, {mine.id: "Active", second.id: "Active"}, None, [])
    with pytest.raises(StateConflict, match="already SUCCEEDED"):
        store.finish_task_failed(task.id, "CARD_REMOVED", "late failure")
    with pytest.raises(InvalidArgument, match="has no card"):
        store.finish_task_succeeded(other_task.id, ISSUED, {theirs.id: "Active"}, "Active", [])


def test_c3_failed_task_leaves_certificates_in_issued_state_with_error(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)

    failed = store.finish_task_failed(task.id, "CARD_REMOVED", "card pulled during write", card_state="Broken",
                                      relations=[NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A")])  # C9 always

    assert failed.state == TaskState.FAILED and failed.error_reason == "CARD_REMOVED" and failed.finished_at
    for cert_id in (a.id, b.id):
        cert = store.certificates.get(cert_id)
        assert cert.state == ISSUED
        assert (cert.task_error_reason, cert.task_error_message) == ("CARD_REMOVED", "card pulled during write")
    assert store.cards.get(card.id).state == "Broken"
    assert store.cards.certificate_ids(card.id) == [a.id]

    # C16: a certificate the reconciler finds later for the failed task carries its error.
    late = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    assert late.task_error_reason == "CARD_REMOVED"


def test_c4_issued_certificates_searchable_by_age_template_card_task(store: Store):
    t1, card1 = production(store, gateway="gw-hq", reader="r1")
    old = store.store_issued_certificate(t1.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    cut = dt.datetime.now(UTC)
    sign1 = store.store_issued_certificate(t1.id, make_cert(), "EmployeeSign", "local", ISSUED)
    store.finish_task_failed(t1.id, "CARD_IO", "reader unplugged")

    t2, card2 = production(store, gateway="gw-branch", reader="r7")
    ok = store.store_issued_certificate(t2.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    store.finish_task_succeeded(t2.id, ISSUED, {ok.id: "Active"}, None,
                                [NewRelation(CARD, card2.id, CERTIFICATE, ok.id, "HAS_A")])

    t3 = store.tasks.create("card_operation", "gw-branch", "r8", card_id=card2.id)
    running = store.store_issued_certificate(t3.id, make_cert(), "EmployeeSign", "local", ISSUED)

    def ids(**kw):
        return [c.id for c in store.certificates.list(**kw)]

    assert ids(state=ISSUED) == [old.id, sign1.id, running.id]          # oldest first
    assert ids(state=ISSUED, issued_before=cut) == [old.id]
    assert ids(state=ISSUED, template="EmployeeSign") == [sign1.id, running.id]
    assert ids(state=ISSUED, card_id=card1.id) == [old.id, sign1.id]     # via the task's card
    assert ids(card_id=card2.id) == [ok.id, running.id]                  # via relation / operation task
    assert ids(state=ISSUED, task_id=t3.id) == [running.id]
    assert ids(state=ISSUED, gateway_id="gw-hq") == [old.id, sign1.id]
    assert ids(state=ISSUED, gateway_id="gw-branch", reader_id="r8") == [running.id]
    assert ids(state=ISSUED, limit=1) == [old.id]
    hit = store.certificates.list(state=ISSUED, card_id=card1.id)[0]
    assert (hit.serial_hex, hit.issuer, hit.template, hit.task_error_reason) == (
        old.serial_hex, old.issuer, "EmployeeAuth", "CARD_IO")
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        store.certificates.list(issued_before=dt.datetime.now())


def test_step_journal_is_an_upsert_per_step(store: Store):
    task = store.tasks.create("card_production", "gw1", "r1")
    first = store.tasks.journal_step(task.id, 1, "generate_key", "SENT")
    store.tasks.journal_step(task.id, 2, "request_certificate", "SENT", detail="request_id=abc")
    again = store.tasks.journal_step(task.id, 1, "generate_key", "DONE", detail="key 01")
    steps = store.tasks.steps(task.id)
    assert [(s.step_number, s.state, s.detail) for s in steps] == [(1, "DONE", "key 01"),
                                                                  (2, "SENT", "request_id=abc")]
    assert again.created_at == first.created_at and again.updated_at >= first.updated_at


def test_unknown_ids_raise_not_found(store: Store):
    for call in (lambda: store.tasks.get("nope"), lambda: store.cards.get("nope"),
                 lambda: store.certificates.get("nope"), lambda: store.tasks.steps("nope"),
                 lambda: store.cards.certificate_ids("nope"),
                 lambda: store.tasks.journal_step("nope", 1, "x", "y"),
                 lambda: store.cards.create("nope", "s", "t", "st", "g", "r"),
                 lambda: store.store_issued_certificate("nope", make_cert(), "T", "local", ISSUED),
                 lambda: store.finish_task_failed("nope", "R", "m"),
                 lambda: store.tasks.create("card_operation", "g", "r", card_id="nope")):
        with pytest.raises(NotFound):
            call()
    assert store.certificates.list() == []


def test_store_is_safe_from_many_threads(store: Store):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for _ in range(5):
                task, card = production(store, gateway=f"gw{n}")
                cert = store.store_issued_certificate(task.id, make_cert(), "T", "local", ISSUED)
                store.tasks.journal_step(task.id, 1, "write", "DONE")
                store.finish_task_succeeded(task.id, ISSUED, {cert.id: "Active"}, "Active",
                                            [NewRelation(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.certificates.list(state="Active")) == 40
    assert len(store.relations.list()) == 40
