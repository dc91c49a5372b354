"""Keyset paging of the List RPCs over the store (orchestrator/store/paging.py with the page
tokens of orchestrator/api/paging.py, through CertificateServicer.ListCertificates) and the
client request ids of the creating RPCs (store.client_requests, revision 0005)."""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import cast

import pytest

from orchestrator.api.certificates import CertificateServicer
from orchestrator.api.paging import MAX_PAGE_SIZE, keyset_of
from orchestrator.services.certificates import CertificateService
from orchestrator.store import Store
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.models import Certificate
from shared.errors import AlreadyExists, InvalidArgument
from shared.proto import certificate_service_pb2 as pb
from tests.integration.test_store import production

COUNT = 10_000


def _bulk_certificates(store: Store, task_id: str, count: int, start: int = 0) -> None:
    """COUNT certificate rows, inserted directly (parsing 10,000 DER certificates adds
    nothing to what paging proves); groups of 7 share one stored time, so the id breaks ties."""
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with store._db.write() as s:
        s.add_all(Certificate(
            id=str(uuid.uuid4()), serial_hex=format(start + n + 1, "x"), issuer="CN=Paging CA",
            subject=f"CN=holder {n}", not_before=base, not_after=base + dt.timedelta(days=365), der=b"\x30\x00",
            template="EmployeeAuthentication", ca_name="local", state="Active", task_id=task_id,
            created_at=base + dt.timedelta(seconds=(start + n) // 7), updated_at=base) for n in range(count))


def _list(servicer: CertificateServicer, **fields) -> pb.ListCertificatesResponse:
    return asyncio.run(servicer.ListCertificates(pb.ListCertificatesRequest(**fields), None))


def test_paging_through_10000_certificates_returns_each_exactly_once(sqlite_store: Store):
    task, _card = production(sqlite_store)
    _bulk_certificates(sqlite_store, task.id, COUNT)
    # ListCertificates reads the store only: no certificate service.
    servicer = CertificateServicer(sqlite_store, certificates=cast(CertificateService, None))
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = _list(servicer, page_size=MAX_PAGE_SIZE, page_token=token)
        seen += [c.id for c in page.certificates]
        pages += 1
        if pages == 3:     # stored while paging: comes last, and only once
            _bulk_certificates(sqlite_store, task.id, 1, start=COUNT)
        if not (token := page.next_page_token):
            break
    assert len(seen) == len(set(seen)) == COUNT + 1
    assert set(seen) == {c.id for c in sqlite_store.certificates.list()}
    assert pages == COUNT // MAX_PAGE_SIZE + 1


def test_page_size_has_a_default_and_a_maximum(sqlite_store: Store):
    task, _card = production(sqlite_store)
    _bulk_certificates(sqlite_store, task.id, 1500)
    servicer = CertificateServicer(sqlite_store, certificates=cast(CertificateService, None))
    assert len(_list(servicer).certificates) == 100
    assert len(_list(servicer, page_size=5000).certificates) == MAX_PAGE_SIZE
    first = _list(servicer, page_size=1000)
    last = _list(servicer, page_size=1000, page_token=first.next_page_token)
    assert len(last.certificates) == 500 and last.next_page_token == ""
    for token in ("not-a-token", "eyJrIjoieCJ9"):     # garbage; a token of an in-memory list ({"k": "x"})
        with pytest.raises(InvalidArgument, match="page_token"):
            keyset_of(pb.ListCertificatesRequest(page_token=token))


def test_certificate_found_by_serial_in_any_form(sqlite_store: Store):
    task, _card = production(sqlite_store)
    _bulk_certificates(sqlite_store, task.id, 300)
    servicer = CertificateServicer(sqlite_store, certificates=cast(CertificateService, None))
    for form in ("01:0D", "010d", "10D", "0x10d", "serial=010D"):
        [hit] = _list(servicer, serial=form).certificates
        assert hit.serial_hex == "10d", form


def test_client_request_claim_returns_the_first_resource(store: Store):
    print_ = fingerprint("produce", [("person", "Alice")])
    assert store.client_requests.claim("task", "req-1", "task-a", print_) == "task-a"
    assert store.client_requests.claim("task", "req-1", "task-b", print_) == "task-a"       # a retry
    assert store.client_requests.claim("order", "req-1", "order-c", print_) == "order-c"    # ids are per kind
    with pytest.raises(AlreadyExists, match="different task request"):
        store.client_requests.claim("task", "req-1", "task-d", fingerprint("produce", [("person", "Bob")]))
    with pytest.raises(InvalidArgument, match="longer than"):
        store.client_requests.claim("task", "x" * 201, "task-e", print_)


def test_create_once_records_the_instance_with_its_request_id(store: Store):
    first, created = store.processes.create_once("produce", {"person": "Alice"}, "req-9", "f1")
    again, created_again = store.processes.create_once("produce", {"person": "Alice"}, "req-9", "f1")
    assert (created, created_again) == (True, False)
    assert again.id == first.id and len(store.processes.list()) == 1


def test_a_released_claim_frees_its_request_id(store: Store):
    assert store.client_requests.claim("order", "req-2", "order-a", "f") == "order-a"
    store.client_requests.release("order", "req-2", "order-b")          # not its resource: kept
    assert store.client_requests.find("order", "req-2") == "order-a"
    store.client_requests.release("order", "req-2", "order-a")
    assert store.client_requests.find("order", "req-2") is None
    assert store.client_requests.claim("order", "req-2", "order-c", "g") == "order-c"
