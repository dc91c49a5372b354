"""Store records → orchestrator.v1 messages, and request messages → service values."""
from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from orchestrator.services.pool import GatewayInfo, PooledReader, ReaderSelector, ReaderState
from orchestrator.services.production import CertificateOrder
from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.store.records import CardRecord, CertificateRecord, ProcessInstanceRecord, TaskRecord
from shared import convert
from shared.proto import common_pb2, orchestrator_pb2

_TASK_STATES = {"RUNNING": orchestrator_pb2.TASK_STATE_RUNNING, "SUCCEEDED": orchestrator_pb2.TASK_STATE_SUCCEEDED,
                "FAILED": orchestrator_pb2.TASK_STATE_FAILED}


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def selector_from_proto(m: orchestrator_pb2.ReaderSelector) -> ReaderSelector:
    return ReaderSelector(gateway_id=m.gateway_id, reader_id=m.reader_id, kind=convert.reader_kind_from_proto(m.kind),
                          site=m.site, labels=dict(m.labels), card_present=m.card_present)


def certificate_orders_from_proto(m: orchestrator_pb2.ProduceCardRequest) -> tuple[CertificateOrder, ...]:
    return tuple(CertificateOrder(template=c.template, key_label=c.key_label,
                                  key_type=convert.key_type_from_proto(c.key_type, f"certificates[{i}].key_type")
                                  if c.key_type else None)
                 for i, c in enumerate(m.certificates))


def task_to_proto(t: TaskRecord, certificate_ids: list[str]) -> orchestrator_pb2.Task:
    error = common_pb2.Error(reason=t.error_reason, message=t.error_message) if t.error_reason else None
    return orchestrator_pb2.Task(
        id=t.id, type=t.type, state=_TASK_STATES.get(t.state, 0), gateway_id=t.gateway_id or "",
        reader_id=t.reader_id or "", card_id=t.card_id or "", certificate_ids=certificate_ids, error=error,
        created_at=timestamp(t.created_at), finished_at=timestamp(t.finished_at))


def card_to_proto(c: CardRecord, certificate_ids: list[str]) -> orchestrator_pb2.Card:
    return orchestrator_pb2.Card(id=c.id, serial=c.serial, state=c.state, template=c.template,
                                 gateway_id=c.gateway_id or "", reader_id=c.reader_id or "",
                                 certificate_ids=certificate_ids, created_at=timestamp(c.created_at))


def certificate_to_proto(c: CertificateRecord, card_id: str = "") -> orchestrator_pb2.Certificate:
    return orchestrator_pb2.Certificate(
        id=c.id, serial_hex=c.serial_hex, issuer=c.issuer, subject=c.subject, not_before=timestamp(c.not_before),
        not_after=timestamp(c.not_after), template=c.template, state=c.state, task_id=c.task_id or "",
        card_id=card_id, der=c.der, task_error=c.task_error_message or "", created_at=timestamp(c.created_at))


_READER_STATES = {ReaderState.EMPTY: orchestrator_pb2.POOLED_READER_STATE_EMPTY,
                  ReaderState.CARD_PRESENT: orchestrator_pb2.POOLED_READER_STATE_CARD_PRESENT,
                  ReaderState.LEASED: orchestrator_pb2.POOLED_READER_STATE_LEASED,
                  ReaderState.BUSY: orchestrator_pb2.POOLED_READER_STATE_BUSY,
                  ReaderState.OFFLINE: orchestrator_pb2.POOLED_READER_STATE_OFFLINE,
                  ReaderState.ERROR: orchestrator_pb2.POOLED_READER_STATE_ERROR}


def pooled_reader_to_proto(p: PooledReader) -> orchestrator_pb2.PooledReader:
    return orchestrator_pb2.PooledReader(gateway_id=p.gateway_id, reader=convert.reader_to_proto(p.reader), busy=p.busy,
                                         state=_READER_STATES[p.state], site=p.site, labels=dict(p.labels),
                                         holder=p.holder)


def gateway_to_proto(g: GatewayInfo) -> orchestrator_pb2.Gateway:
    return orchestrator_pb2.Gateway(gateway_id=g.gateway_id, site=g.site, labels=dict(g.labels), connected=g.connected,
                                    readers=g.readers, connected_since=timestamp(g.connected_since),
                                    last_seen=timestamp(g.last_seen), version=g.version)


def lease_to_proto(lease) -> orchestrator_pb2.Lease:
    """A ServiceLease (orchestrator/services/leases.py)."""
    return orchestrator_pb2.Lease(lease_id=lease.lease_id, gateway_id=lease.gateway_id,
                                  reader=convert.reader_to_proto(lease.reader), expires_at=timestamp(lease.expires_at))


_ORDER_STATES = {"RUNNING": orchestrator_pb2.ORDER_STATE_RUNNING, "DONE": orchestrator_pb2.ORDER_STATE_DONE,
                 "CANCELLED": orchestrator_pb2.ORDER_STATE_CANCELLED}


def order_to_proto(order) -> orchestrator_pb2.Order:
    """An Order (orchestrator/services/orders.py)."""
    return orchestrator_pb2.Order(
        id=order.id, process=order.process, state=_ORDER_STATES[order.state], created_at=timestamp(order.created_at),
        cards=[orchestrator_pb2.OrderCard(
            index=c.index, state=c.state, queue_position=c.queue_position, gateway_id=c.gateway_id,
            reader_id=c.reader_id, process_instance_id=c.process_instance_id,
            error=common_pb2.Error(reason=c.error_reason, message=c.error_message) if c.error_reason else None)
            for c in order.cards])


# --- processes -------------------------------------------------------------------------

_PROCESS_STATES = {"RUNNING": orchestrator_pb2.PROCESS_STATE_RUNNING,
                   "SUCCEEDED": orchestrator_pb2.PROCESS_STATE_SUCCEEDED,
                   "FAILED": orchestrator_pb2.PROCESS_STATE_FAILED}


def value_from_proto(m: common_pb2.Value) -> object:
    kind = m.WhichOneof("kind")
    if kind == "descriptor":
        return CoreObjectDescriptor(m.descriptor.type, m.descriptor.template, m.descriptor.id)
    if kind == "list":
        return [value_from_proto(v) for v in m.list.values]
    return m.text


def value_to_proto(value: object) -> common_pb2.Value:
    """From the process map's JSON form: descriptors are dicts, lists are lists."""
    if isinstance(value, CoreObjectDescriptor):
        value = value.to_dict()
    if isinstance(value, dict):
        return common_pb2.Value(descriptor=common_pb2.CoreObjectDescriptor(
            type=value.get("type", ""), template=value.get("template", ""), id=value.get("id", "")))
    if isinstance(value, list):
        return common_pb2.Value(list=common_pb2.ValueList(values=[value_to_proto(v) for v in value]))
    return common_pb2.Value(text="" if value is None else str(value))


def process_instance_to_proto(p: ProcessInstanceRecord, task_ids: list[str]) -> orchestrator_pb2.ProcessInstance:
    error = common_pb2.Error(reason=p.error_reason, message=p.error_message or "") if p.error_reason else None
    return orchestrator_pb2.ProcessInstance(
        id=p.id, definition=p.definition, state=_PROCESS_STATES.get(p.state, 0),
        process_map={k: value_to_proto(v) for k, v in p.process_map.items()}, error=error, task_ids=task_ids,
        created_at=timestamp(p.created_at), finished_at=timestamp(p.finished_at))


def descriptor_to_proto(d) -> common_pb2.CoreObjectDescriptor:
    return common_pb2.CoreObjectDescriptor(type=d.type, template=d.template, id=d.id)


def issued_hit_to_proto(h) -> orchestrator_pb2.IssuedCertificate:
    error = (common_pb2.Error(reason=h.task_error_reason, message=h.task_error_message or "")
             if h.task_error_reason else None)
    return orchestrator_pb2.IssuedCertificate(
        descriptor=descriptor_to_proto(h.descriptor), serial_hex=h.serial_hex, issuer=h.issuer, subject=h.subject,
        created_at=timestamp(h.created_at), task_id=h.task_id or "", task_error=error)


def handling_result_to_proto(r) -> orchestrator_pb2.HandlingResult:
    error = None
    if r.error:                      # "REASON: message"
        reason, _, message = r.error.partition(": ")
        error = common_pb2.Error(reason=reason, message=message)
    return orchestrator_pb2.HandlingResult(certificate_id=r.certificate_id, serial_hex=r.serial_hex or "",
                                           revoked=r.revoked, state=r.state or "", skipped=r.skipped or "",
                                           error=error)
