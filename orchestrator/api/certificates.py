"""CertificateService: thin — convert the request, call the store or the certificate
service, convert the answer."""
from __future__ import annotations

import asyncio
import datetime as dt

from orchestrator.api import convert as conv
from orchestrator.api.paging import next_page_token, page_window
from orchestrator.services.certificates import CertificateService
from orchestrator.store.store import Store
from shared.errors import InvalidArgument
from shared.proto import certificate_service_pb2 as pb
from shared.proto import certificate_service_pb2_grpc
from shared.rpc import rpc_errors


class CertificateServicer(certificate_service_pb2_grpc.CertificateServiceServicer):
    def __init__(self, store: Store, certificates: CertificateService) -> None:
        self.store = store
        self.certificates = certificates

    @rpc_errors
    async def GetCertificate(self, request, context):
        cert = await asyncio.to_thread(self.store.certificates.get, request.certificate_id)
        card_id = await asyncio.to_thread(self._card_of, cert.id)
        return pb.GetCertificateResponse(certificate=conv.certificate_to_proto(cert, card_id))

    @rpc_errors
    async def ListCertificates(self, request, context):
        def certificates_with_cards():
            certs = self.store.certificates.list(
                state=request.state or None, template=request.template or None, card_id=request.card_id or None,
                task_id=request.task_id or None, limit=request.limit or None)
            return [(c, self._card_of(c.id)) for c in certs]

        rows = await asyncio.to_thread(certificates_with_cards)
        return pb.ListCertificatesResponse(certificates=[conv.certificate_to_proto(c, card) for c, card in rows])

    def _card_of(self, certificate_id: str) -> str:
        """The card a certificate is related to (blocking: call it in a thread)."""
        relations = self.store.relations.list(target_id=certificate_id)
        return next((r.source_id for r in relations if r.source_type == "Card"), "")

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
            revoke_reason=request.revoke_reason or None, target_state=request.target_state or None, actor="api")
        return pb.HandleIssuedCertificatesResponse(results=[conv.handling_result_to_proto(r) for r in results])

    @rpc_errors
    async def ChangeCertificateState(self, request, context):
        change = self.certificates.change_state_in_ca if request.in_ca else self.certificates.change_state
        record = await asyncio.to_thread(change, request.certificate_id, request.state, request.reason or None, "api")
        return pb.ChangeCertificateStateResponse(certificate=conv.certificate_to_proto(record))

    @rpc_errors
    async def ListExpiringCertificates(self, request, context):
        if request.days <= 0:
            raise InvalidArgument("days must be a positive number of days", field="days")
        offset, size = page_window(request.page_size, request.page_token)
        now = dt.datetime.now(dt.UTC)

        def expiring_with_cards():
            certs = self.store.certificates.list(
                state=request.state or None, template=request.template or None, card_id=request.card_id or None,
                valid_at=now, expiring_before=now + dt.timedelta(days=request.days), offset=offset, limit=size + 1)
            return [(c, self._card_of(c.id)) for c in certs[:size]], len(certs)

        rows, fetched = await asyncio.to_thread(expiring_with_cards)
        return pb.ListExpiringCertificatesResponse(
            certificates=[conv.certificate_to_proto(c, card) for c, card in rows],
            next_page_token=next_page_token(offset, size, fetched))
