"""Store records → orchestrator.v1 messages, and request messages → service values."""
from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.services import orders
from orchestrator.services.card_tasks import task_error
from orchestrator.services.pool import GatewayInfo, PooledReader, ReaderSelector, ReaderState
from orchestrator.services.production import CertificateOrder
from orchestrator.store.records import (
    CardRecord,
    CaRequestRecord,
    CaRequestState,
    CertificateRecord,
    ProcessInstanceRecord,
    ProcessState,
    TaskRecord,
    TaskState,
)
from shared import convert
from shared.proto import ca_service_pb2 as ca_pb
from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import order_service_pb2 as order_pb
from shared.proto import process_service_pb2 as process_pb
from shared.proto import reader_pool_service_pb2 as pool_pb

_TASK_STATES = {TaskState.RUNNING: card_pb.TASK_STATE_RUNNING, TaskState.SUCCEEDED: card_pb.TASK_STATE_SUCCEEDED,
                TaskState.FAILED: card_pb.TASK_STATE_FAILED}


def task_state_from_proto(value: int) -> TaskState | None:
    """A TaskState filter: None for TASK_STATE_UNSPECIFIED (any state)."""
    return next((s for s, v in _TASK_STATES.items() if v == value), None)


def process_state_from_proto(value: int) -> ProcessState | None:
    """A ProcessState filter: None for PROCESS_STATE_UNSPECIFIED (any state)."""
    return next((s for s, v in _PROCESS_STATES.items() if v == value), None)


def task_type_to_proto(name: str) -> card_pb.TaskType.ValueType:
    """A task type of domain/processes.py (card_production, ...) as its enum value."""
    return card_pb.TaskType.Value(f"TASK_TYPE_{name.upper()}")


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def selector_from_proto(m: pool_pb.ReaderSelector) -> ReaderSelector:
    return ReaderSelector(gateway_id=m.gateway_id, reader_id=m.reader_id, kind=convert.reader_kind_from_proto(m.kind),
                          site=m.site, labels=dict(m.labels), card_present=m.card_present)


def certificate_orders_from_proto(m: card_pb.ProduceCardRequest) -> tuple[CertificateOrder, ...]:
    return tuple(CertificateOrder(template=c.template, key_label=c.key_label,
                                  key_type=convert.key_type_from_proto(c.key_type, f"certificates[{i}].key_type")
                                  if c.key_type else None)
                 for i, c in enumerate(m.certificates))


def task_to_proto(t: TaskRecord, certificate_ids: list[str]) -> card_pb.Task:
    failure = task_error(t)
    error = convert.error_to_proto(failure) if failure is not None else None
    return card_pb.Task(
        id=t.id, type=task_type_to_proto(t.type), state=_TASK_STATES.get(t.state, card_pb.TASK_STATE_UNSPECIFIED),
        gateway_id=t.gateway_id or "",
        reader_id=t.reader_id or "", card_id=t.card_id or "", certificate_ids=certificate_ids, error=error,
        created_at=timestamp(t.created_at), finished_at=timestamp(t.finished_at))


def card_to_proto(c: CardRecord, certificate_ids: list[str]) -> card_pb.Card:
    return card_pb.Card(id=c.id, serial=c.serial, state=c.state, template=c.template,
                                 gateway_id=c.gateway_id or "", reader_id=c.reader_id or "",
                                 certificate_ids=certificate_ids, created_at=timestamp(c.created_at),
                                 holder=c.holder or "")


def certificate_to_proto(c: CertificateRecord, card_id: str = "") -> certificate_pb.Certificate:
    return certificate_pb.Certificate(
        id=c.id, serial_hex=c.serial_hex, issuer=c.issuer, subject=c.subject, not_before=timestamp(c.not_before),
        not_after=timestamp(c.not_after), template=c.template, state=c.state, task_id=c.task_id or "",
        card_id=card_id, der=c.der, task_error=c.task_error_message or "", created_at=timestamp(c.created_at))


_READER_STATES = {ReaderState.EMPTY: pool_pb.POOLED_READER_STATE_EMPTY,
                  ReaderState.CARD_PRESENT: pool_pb.POOLED_READER_STATE_CARD_PRESENT,
                  ReaderState.LEASED: pool_pb.POOLED_READER_STATE_LEASED,
                  ReaderState.BUSY: pool_pb.POOLED_READER_STATE_BUSY,
                  ReaderState.OFFLINE: pool_pb.POOLED_READER_STATE_OFFLINE,
                  ReaderState.ERROR: pool_pb.POOLED_READER_STATE_ERROR}


def pooled_reader_to_proto(p: PooledReader) -> pool_pb.PooledReader:
    return pool_pb.PooledReader(gateway_id=p.gateway_id, reader=convert.reader_to_proto(p.reader), busy=p.busy,
                                         state=_READER_STATES[p.state], site=p.site, labels=dict(p.labels),
                                         holder=p.holder)


def gateway_to_proto(g: GatewayInfo) -> pool_pb.Gateway:
    return pool_pb.Gateway(gateway_id=g.gateway_id, site=g.site, labels=dict(g.labels), connected=g.connected,
                                    readers=g.readers, connected_since=timestamp(g.connected_since),
                                    last_seen=timestamp(g.last_seen), version=g.version)


def lease_to_proto(lease) -> lease_pb.Lease:
    """A ServiceLease (orchestrator/services/leases.py)."""
    return lease_pb.Lease(lease_id=lease.lease_id, gateway_id=lease.gateway_id,
                                  reader=convert.reader_to_proto(lease.reader), expires_at=timestamp(lease.expires_at))


_ORDER_STATES = {"RUNNING": order_pb.ORDER_STATE_RUNNING, "DONE": order_pb.ORDER_STATE_DONE,
                 "CANCELLED": order_pb.ORDER_STATE_CANCELLED}
_ORDER_CARD_STATES = {orders.QUEUED: order_pb.ORDER_CARD_STATE_QUEUED,
                      orders.RUNNING: order_pb.ORDER_CARD_STATE_RUNNING,
                      orders.SUCCEEDED: order_pb.ORDER_CARD_STATE_SUCCEEDED,
                      orders.FAILED: order_pb.ORDER_CARD_STATE_FAILED}


def order_to_proto(order) -> order_pb.Order:
    """An Order (orchestrator/services/orders.py)."""
    return order_pb.Order(
        id=order.id, process=order.process, state=_ORDER_STATES[order.state], created_at=timestamp(order.created_at),
        cards=[order_pb.OrderCard(
            index=c.index, state=_ORDER_CARD_STATES[c.state], queue_position=c.queue_position, gateway_id=c.gateway_id,
            reader_id=c.reader_id, process_instance_id=c.process_instance_id,
            error=common_pb2.Error(reason=c.error_reason, message=c.error_message) if c.error_reason else None)
            for c in order.cards])


# --- processes -------------------------------------------------------------------------

_PROCESS_STATES = {ProcessState.RUNNING: process_pb.PROCESS_STATE_RUNNING,
                   ProcessState.SUCCEEDED: process_pb.PROCESS_STATE_SUCCEEDED,
                   ProcessState.FAILED: process_pb.PROCESS_STATE_FAILED}


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


def process_instance_to_proto(p: ProcessInstanceRecord, task_ids: list[str]) -> process_pb.ProcessInstance:
    error = common_pb2.Error(reason=p.error_reason, message=p.error_message or "") if p.error_reason else None
    return process_pb.ProcessInstance(
        id=p.id, definition=p.definition, state=_PROCESS_STATES.get(p.state, process_pb.PROCESS_STATE_UNSPECIFIED),
        process_map={k: value_to_proto(v) for k, v in p.process_map.items()}, error=error, task_ids=task_ids,
        created_at=timestamp(p.created_at), finished_at=timestamp(p.finished_at))


def descriptor_to_proto(d) -> common_pb2.CoreObjectDescriptor:
    return common_pb2.CoreObjectDescriptor(type=d.type, template=d.template, id=d.id)


def issued_hit_to_proto(h) -> certificate_pb.IssuedCertificate:
    error = (common_pb2.Error(reason=h.task_error_reason, message=h.task_error_message or "")
             if h.task_error_reason else None)
    return certificate_pb.IssuedCertificate(
        descriptor=descriptor_to_proto(h.descriptor), serial_hex=h.serial_hex, issuer=h.issuer, subject=h.subject,
        created_at=timestamp(h.created_at), task_id=h.task_id or "", task_error=error)


def handling_result_to_proto(r) -> certificate_pb.HandlingResult:
    error = None
    if r.error:                      # "REASON: message"
        reason, _, message = r.error.partition(": ")
        error = common_pb2.Error(reason=reason, message=message)
    return certificate_pb.HandlingResult(certificate_id=r.certificate_id, serial_hex=r.serial_hex or "",
                                           revoked=r.revoked, state=r.state or "", skipped=r.skipped or "",
                                           error=error)


_CA_REQUEST_STATES = {CaRequestState.PENDING: ca_pb.CA_REQUEST_STATE_PENDING,
                      CaRequestState.STORED: ca_pb.CA_REQUEST_STATE_STORED,
                      CaRequestState.WRITTEN: ca_pb.CA_REQUEST_STATE_WRITTEN,
                      CaRequestState.NOT_ISSUED: ca_pb.CA_REQUEST_STATE_NOT_ISSUED}


def ca_request_to_proto(r: CaRequestRecord) -> ca_pb.CaRequest:
    return ca_pb.CaRequest(request_id=r.request_id, ca=r.ca_name, task_id=r.task_id, state=_CA_REQUEST_STATES[r.state],
                           serial_hex=r.serial_hex or "", certificate_id=r.certificate_id or "",
                           created_at=timestamp(r.created_at), updated_at=timestamp(r.updated_at))


def process_definition_to_proto(d) -> process_pb.ProcessDefinition:
    """A ProcessDefinition (domain/processes.py)."""
    return process_pb.ProcessDefinition(name=d.name, description=d.description, inputs=d.inputs,
                                        secret_inputs=d.secret_inputs,
                                        task_types=[task_type_to_proto(t.type) for t in d.tasks])
