"""CertificateService: thin — convert the request, call the store or the certificate
service, convert the answer."""
from __future__ import annotations

import asyncio
import datetime as dt

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.services.certificates import CertificateService
from orchestrator.store.records import CertificateRecord
from orchestrator.store.store import Store
from shared.errors import InvalidArgument, NotFound
from shared.limits import check_days
from shared.proto import certificate_service_pb2 as pb
from shared.proto import certificate_service_pb2_grpc
from shared.rpc import rpc_errors
from shared.serials import show_serial, stored_hex
from shared.tls import current_actor


class CertificateServicer(certificate_service_pb2_grpc.CertificateServiceServicer):
    def __init__(self, store: Store, certificates: CertificateService) -> None:
        self.store = store
        self.certificates = certificates

    @rpc_errors
    async def GetCertificate(self, request, context):
        cert = await asyncio.to_thread(self._find, request)
        card_id = await asyncio.to_thread(self._card_of, cert.id)
        return pb.GetCertificateResponse(certificate=conv.certificate_to_proto(cert, card_id))

    def _find(self, request) -> CertificateRecord:
        """By id, or by serial (and issuer when two CAs issued that serial). Blocking."""
        if request.certificate_id:
            return self.store.certificates.get(request.certificate_id)
        if not request.serial:
            raise InvalidArgument("give a certificate_id or a serial", field="certificate_id")
        serial_hex = stored_hex(request.serial)
        hits = [c for c in self.store.certificates.list(serial_hex=serial_hex)
                if not request.issuer or c.issuer == request.issuer]
        if not hits:
            raise NotFound(f"no certificate with serial {show_serial(serial_hex)}"
                           + (f" issued by {request.issuer}" if request.issuer else ""), serial=serial_hex)
        if len(hits) > 1:
            raise InvalidArgument(f"{len(hits)} certificates have serial {show_serial(serial_hex)}; give the "
                                  f"issuer too: {'; '.join(f'{c.id} ({c.issuer})' for c in hits)}",
                                  field="issuer")
        return hits[0]

    @rpc_errors
    async def ListCertificates(self, request, context):
        size = paging.page_size(request)
        after = paging.keyset_of(request)
        serial_hex = stored_hex(request.serial) if request.serial else None

        def certificates_with_cards():
            certs = self.store.certificates.list(
                state=request.state or None, template=request.template or None, card_id=request.card_id or None,
                task_id=request.task_id or None, serial_hex=serial_hex, after=after, limit=size + 1)
            page, token = paging.keyset_page(certs, size, lambda c: (c.created_at, c.id))
            cards = self.store.relations.cards_of([c.id for c in page])
            return [(c, cards.get(c.id, "")) for c in page], token

        rows, token = await asyncio.to_thread(certificates_with_cards)
        return pb.ListCertificatesResponse(certificates=[conv.certificate_to_proto(c, card) for c, card in rows],
                                           next_page_token=token)

    def _card_of(self, certificate_id: str) -> str:
        """The card a certificate is related to (blocking: call it in a thread)."""
        return self.store.relations.cards_of([certificate_id]).get(certificate_id, "")

    @rpc_errors
    async def SearchIssuedCertificates(self, request, context):
        older_than = request.older_than.ToTimedelta() if request.HasField("older_than") else None
        hits = await asyncio.to_thread(self.certificates.search_issued, older_than=older_than,
                                       template=request.template or None, card_id=request.card_id or None,
                                       gateway_id=request.gateway_id or None, reader_id=request.reader_id or None,
                                       task_id=request.task_id or None, limit=request.limit or None)
        return pb.SearchIssuedCertificatesResponse(certificates=[conv.issued_hit_to_proto(h) for h in hits])

    @rpc_errors
    async def HandleIssuedCertificates(self, request, context):
        results = await asyncio.to_thread(
            self.certificates.handle_issued, list(request.certificate_ids) or None,
            revoke_reason=request.revoke_reason or None, target_state=request.target_state or None,
            actor=current_actor())
        return pb.HandleIssuedCertificatesResponse(results=[conv.handling_result_to_proto(r) for r in results])

    @rpc_errors
    async def ChangeCertificateState(self, request, context):
        change = self.certificates.change_state_in_ca if request.in_ca else self.certificates.change_state
        record = await asyncio.to_thread(change, request.certificate_id, request.state, request.reason or None,
                                         current_actor())
        return pb.ChangeCertificateStateResponse(certificate=conv.certificate_to_proto(record))

    @rpc_errors
    async def ListExpiringCertificates(self, request, context):
        if request.days <= 0:
            raise InvalidArgument("days must be a positive number of days", field="days")
        within = check_days(request.days, "days")
        size = paging.page_size(request)
        after = paging.keyset_of(request)
        now = dt.datetime.now(dt.UTC)

        def expiring_with_cards():
            certs = self.store.certificates.list(
                state=request.state or None, template=request.template or None, card_id=request.card_id or None,
                valid_at=now, expiring_before=now + within, after=after, limit=size + 1)
            page, token = paging.keyset_page(certs, size, lambda c: (c.created_at, c.id))
            cards = self.store.relations.cards_of([c.id for c in page])
            return [(c, cards.get(c.id, "")) for c in page], token

        rows, token = await asyncio.to_thread(expiring_with_cards)
        return pb.ListExpiringCertificatesResponse(
            certificates=[conv.certificate_to_proto(c, card) for c, card in rows], next_page_token=token)
