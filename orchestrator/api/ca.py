"""CaService: thin — the CAs' certificates and the CA request journal (rule C16)."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.ca.base import CaConnector
from orchestrator.services.reconciler import Reconciler
from orchestrator.store.records import AUDIT_RECONCILE_REQUESTED, CaRequestState
from orchestrator.store.store import Store
from shared.errors import NotFound, UnsupportedOperation, quoted
from shared.proto import ca_service_pb2 as pb
from shared.proto import ca_service_pb2_grpc
from shared.rpc import rpc_errors
from shared.tls import current_actor


class CaServicer(ca_service_pb2_grpc.CaServiceServicer):
    def __init__(self, store: Store, cas: dict[str, CaConnector], reconciler: Reconciler | None) -> None:
        self.store = store
        self.cas = cas
        self.reconciler = reconciler

    @rpc_errors
    async def GetCaCertificate(self, request, context):
        name = request.ca or "local"
        ca = self.cas.get(name)
        if ca is None:
            raise NotFound(f"no CA named {quoted(name)} (known: {', '.join(sorted(self.cas))})", ca=name)
        return pb.GetCaCertificateResponse(certificate_der=await asyncio.to_thread(ca.ca_certificate_der))

    @rpc_errors
    async def ListCaRequests(self, request, context):
        states = [CaRequestState.PENDING] if request.unsettled_only else None
        size = paging.page_size(request)
        rows = await asyncio.to_thread(self.store.ca_requests.list, states=states, task_id=request.task_id or None,
                                       after=paging.keyset_of(request), limit=size + 1)
        page, token = paging.keyset_page(rows, size, lambda r: (r.created_at, r.request_id))
        return pb.ListCaRequestsResponse(requests=[conv.ca_request_to_proto(r) for r in page], next_page_token=token)

    @rpc_errors
    async def GetCaRequest(self, request, context):
        row = await asyncio.to_thread(self.store.ca_requests.get, request.request_id)
        return pb.GetCaRequestResponse(request=conv.ca_request_to_proto(row))

    @rpc_errors
    async def Reconcile(self, request, context):
        if self.reconciler is None:
            raise UnsupportedOperation("this orchestrator runs no reconciler")
        await asyncio.to_thread(self.store.audit.record, AUDIT_RECONCILE_REQUESTED, "Reconciliation", "now",
                                current_actor())
        report = await asyncio.to_thread(self.reconciler.reconcile_once)
        return pb.ReconcileResponse(examined=report.examined, stored=report.stored, not_issued=report.not_issued,
                                    tasks_ended=report.tasks_ended)
