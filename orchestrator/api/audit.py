"""AuditService: thin — the audit trail for auditors (docs/audit.md): a filtered, paged
listing and the chain's verification."""
from __future__ import annotations

import asyncio
import datetime as dt

from google.protobuf import struct_pb2

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.domain.audit_chain import ChainFault, ChainReport
from orchestrator.store.audit import AuditFilter
from orchestrator.store.records import AuditRecord
from orchestrator.store.store import Store
from shared.errors import InvalidArgument
from shared.proto import audit_service_pb2 as pb
from shared.proto import audit_service_pb2_grpc
from shared.rpc import rpc_errors

FAULTS = {ChainFault.EDITED: pb.AUDIT_FAULT_EDITED, ChainFault.DELETED: pb.AUDIT_FAULT_DELETED,
          ChainFault.INSERTED: pb.AUDIT_FAULT_INSERTED, ChainFault.REORDERED: pb.AUDIT_FAULT_REORDERED}


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @rpc_errors
    async def ListAuditEvents(self, request, context):
        where = AuditFilter(
            object_id=request.object_id or None, action=request.action or None, actor=request.actor or None,
            since=request.since.ToDatetime(tzinfo=dt.UTC) if request.HasField("since") else None,
            until=request.until.ToDatetime(tzinfo=dt.UTC) if request.HasField("until") else None,
            card_id=request.card_id or None, certificate_id=request.certificate_id or None,
            task_id=request.task_id or None)
        size = paging.page_size(request)
        rows = await asyncio.to_thread(self.store.audit.list, where=where, after_id=_after_id(request),
                                       limit=size + 1)
        page, token = paging.keyset_page(rows, size, lambda r: (r.at, str(r.id)))
        return pb.ListAuditEventsResponse(events=[audit_event_to_proto(r) for r in page], next_page_token=token)

    @rpc_errors
    async def VerifyAudit(self, request, context):
        return verify_response(await asyncio.to_thread(self.store.audit.verify, request.expected_head or None))


def verify_response(report: ChainReport) -> pb.VerifyAuditResponse:
    return pb.VerifyAuditResponse(intact=report.intact, rows=report.rows, head=report.head, problems=[
        pb.AuditProblem(row_id=p.row_id, fault=FAULTS[p.fault], message=p.message) for p in report.problems])


def _after_id(request) -> int | None:
    """The id the previous page ended with (the rows page by id, the order of writing)."""
    keyset = paging.keyset_of(request)
    if keyset is None:
        return None
    try:
        return int(keyset[1])
    except ValueError:
        raise InvalidArgument("page_token is not a token of this list", field="page_token") from None


def audit_event_to_proto(r: AuditRecord) -> pb.AuditEvent:
    detail = struct_pb2.Struct()
    detail.update(r.detail)
    return pb.AuditEvent(
        id=r.id, at=conv.timestamp(r.at), actor=r.actor, action=r.action, object_type=r.object_type,
        object_id=r.object_id, detail=detail, card_id=r.card_id or "", task_id=r.task_id or "",
        gateway_id=r.gateway_id or "", reader_id=r.reader_id or "", step=r.step or 0,
        certificates=[pb.AuditCertificate(id=c.get("id", ""), ca=c.get("ca", ""), serial_hex=c.get("serial_hex", ""))
                      for c in r.certificates],
        prev_hash=r.prev_hash or "", hash=r.hash or "")
