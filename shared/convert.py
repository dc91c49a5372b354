"""Explicit conversion between shared/cards.py values and protobuf messages.

Only edges (servicers, the gateway link, clients) call these; everything behind them works
on plain dataclasses.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from shared import cards
from shared.errors import CardlineError, InvalidArgument, from_details, from_reason
from shared.proto import common_pb2, gateway_pb2, steps_pb2

_KEY_TYPES = {
    cards.KeyType.EC_P256: common_pb2.KEY_TYPE_EC_P256,
    cards.KeyType.RSA_2048: common_pb2.KEY_TYPE_RSA_2048,
    cards.KeyType.RSA_3072: common_pb2.KEY_TYPE_RSA_3072,
}
_KEY_TYPES_BACK: dict[int, cards.KeyType] = {v: k for k, v in _KEY_TYPES.items()}
_ALGORITHMS = {
    cards.SignatureAlgorithm.ECDSA_SHA256: common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
    cards.SignatureAlgorithm.RSA_PKCS1_SHA256: common_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256,
}
_ALGORITHMS_BACK = {v: k for k, v in _ALGORITHMS.items()}
_KINDS = {cards.ReaderKind.PCSC: common_pb2.READER_KIND_PCSC, cards.ReaderKind.PKCS11: common_pb2.READER_KIND_PKCS11}
_KINDS_BACK: dict[int, cards.ReaderKind] = {v: k for k, v in _KINDS.items()}
_CLASSES = {
    cards.ObjectClass.PUBLIC_KEY: steps_pb2.OBJECT_CLASS_PUBLIC_KEY,
    cards.ObjectClass.PRIVATE_KEY: steps_pb2.OBJECT_CLASS_PRIVATE_KEY,
    cards.ObjectClass.CERTIFICATE: steps_pb2.OBJECT_CLASS_CERTIFICATE,
    cards.ObjectClass.DATA: steps_pb2.OBJECT_CLASS_DATA,
    cards.ObjectClass.SECRET_KEY: steps_pb2.OBJECT_CLASS_SECRET_KEY,
}
_CLASSES_BACK = {v: k for k, v in _CLASSES.items()}


def key_type_to_proto(key_type: cards.KeyType) -> int:
    return _KEY_TYPES[key_type]


def key_type_from_proto(value: int, field: str = "key_type") -> cards.KeyType:
    try:
        return _KEY_TYPES_BACK[value]
    except KeyError:
        raise InvalidArgument(f"{field}: unknown or unspecified key type {value}", field=field) from None


def reader_kind_from_proto(value: int) -> cards.ReaderKind | None:
    return _KINDS_BACK.get(value)


def reader_kind_to_proto(kind: cards.ReaderKind | None) -> int:
    return _KINDS[kind] if kind else common_pb2.READER_KIND_UNSPECIFIED


# --- readers ---------------------------------------------------------------------------

def reader_to_proto(r: cards.Reader) -> common_pb2.Reader:
    return common_pb2.Reader(reader_id=r.reader_id, kind=_KINDS[r.kind], name=r.name,
                             card_present=r.card_present, atr=r.atr, token_label=r.token_label,
                             token_serial=r.token_serial, token_model=r.token_model, error=r.error)


def reader_from_proto(m: common_pb2.Reader) -> cards.Reader:
    kind = _KINDS_BACK.get(m.kind)
    if kind is None:
        raise InvalidArgument(f"reader {m.reader_id!r}: unspecified kind", field="reader.kind")
    return cards.Reader(reader_id=m.reader_id, kind=kind, name=m.name, card_present=m.card_present,
                        atr=m.atr, token_label=m.token_label, token_serial=m.token_serial,
                        token_model=m.token_model, error=m.error)


# --- errors ----------------------------------------------------------------------------

def error_to_proto(err: CardlineError) -> common_pb2.Error:
    """The error with its typed details (a Struct) and the same details as text."""
    details = struct_pb2.Struct()
    details.update(err.to_details())
    return common_pb2.Error(reason=err.reason, message=err.message, metadata=err.metadata, details=details)


def error_from_proto(m: common_pb2.Error) -> CardlineError:
    """The same class with the same typed attributes; from the text metadata when a sender
    gave no typed details."""
    if m.HasField("details"):
        return from_details(m.reason, m.message, json_format.MessageToDict(m.details))
    return from_reason(m.reason, m.message, dict(m.metadata))


# --- steps: one table of step operations -------------------------------------------------
#
# Each operation is one row: its Step.operation case in steps.proto and its dataclass in
# shared/cards.py, the StepOutcome.result case and dataclass of its value, and the four
# conversions. step_to_proto / step_from_proto / value_to_outcome / value_from_outcome read
# only this table; the gateway's dispatch is keyed by the same dataclasses, and
# tests/unit/test_convert.py checks the table against steps.proto.

@dataclass(frozen=True)
class StepOperation:
    field: str                                  # case of the Step.operation oneof
    operation: type                             # the shared.cards dataclass
    to_proto: Callable[[Any], Message]
    from_proto: Callable[[Any], cards.Operation]    # checks the message; InvalidArgument names the field
    result_field: str                           # case of the StepOutcome.result oneof
    value: type                                 # the shared.cards dataclass of its value
    value_to_proto: Callable[[Any], Message]
    value_from_proto: Callable[[Any], cards.StepValue]


def _generate_key_pair(m: steps_pb2.GenerateKeyPair) -> cards.GenerateKeyPair:
    if not m.key_id:
        raise InvalidArgument("generate_key_pair.key_id is empty", field="generate_key_pair.key_id")
    return cards.GenerateKeyPair(key_type_from_proto(m.key_type, "generate_key_pair.key_type"),
                                 m.label, m.key_id, m.csr_subject)


def _sign(m: steps_pb2.Sign) -> cards.Sign:
    if m.algorithm not in _ALGORITHMS_BACK:
        raise InvalidArgument("sign.algorithm is unspecified", field="sign.algorithm")
    return cards.Sign(m.key_id, _ALGORITHMS_BACK[m.algorithm], m.data)


def _import_key_pair(m: steps_pb2.ImportKeyPair) -> cards.ImportKeyPair:
    if not m.key_id or not m.private_key_der:
        raise InvalidArgument("import_key_pair needs key_id and private_key_der", field="import_key_pair")
    return cards.ImportKeyPair(m.key_id, m.label, m.private_key_der, m.certificate_der)


def _set_pins(m: steps_pb2.SetPins) -> cards.SetPins:
    if not m.new_user_pin and not m.new_so_pin:
        raise InvalidArgument("set_pins sets no PIN", field="set_pins")
    return cards.SetPins(m.new_user_pin, m.new_so_pin)


def _object_to_proto(o: cards.StoredObject) -> steps_pb2.TokenObject:
    return steps_pb2.TokenObject(object_class=_CLASSES[o.object_class], key_id=o.key_id, label=o.label,
                                 key_type=_KEY_TYPES.get(o.key_type, common_pb2.KEY_TYPE_UNSPECIFIED)
                                 if o.key_type else common_pb2.KEY_TYPE_UNSPECIFIED,
                                 certificate_der=o.certificate_der)


def _object_from_proto(o: steps_pb2.TokenObject) -> cards.StoredObject:
    return cards.StoredObject(_CLASSES_BACK[o.object_class], o.key_id, o.label, _KEY_TYPES_BACK.get(o.key_type),
                              o.certificate_der)


STEP_OPERATIONS: tuple[StepOperation, ...] = (
    StepOperation(
        "generate_key_pair", cards.GenerateKeyPair,
        lambda op: steps_pb2.GenerateKeyPair(key_type=_KEY_TYPES[op.key_type], label=op.label, key_id=op.key_id,
                                             csr_subject=op.csr_subject),
        _generate_key_pair,
        "key_pair_generated", cards.GeneratedKey,
        lambda v: steps_pb2.KeyPairGenerated(key_id=v.key_id, public_key_der=v.public_key_der, csr_der=v.csr_der),
        lambda m: cards.GeneratedKey(m.key_id, m.public_key_der, m.csr_der)),
    StepOperation(
        "sign", cards.Sign,
        lambda op: steps_pb2.Sign(key_id=op.key_id, algorithm=_ALGORITHMS[op.algorithm], data=op.data),
        _sign,
        "signed", cards.Signature,
        lambda v: steps_pb2.Signed(signature=v.signature),
        lambda m: cards.Signature(m.signature)),
    StepOperation(
        "write_certificates", cards.WriteCertificates,
        lambda op: steps_pb2.WriteCertificates(certificates=[
            steps_pb2.CertificateObject(key_id=c.key_id, label=c.label, certificate_der=c.certificate_der)
            for c in op.certificates]),
        lambda m: cards.WriteCertificates(tuple(cards.CertificateObject(c.key_id, c.label, c.certificate_der)
                                                for c in m.certificates)),
        "certificates_written", cards.WrittenCertificates,
        lambda v: steps_pb2.CertificatesWritten(key_ids=list(v.key_ids)),
        lambda m: cards.WrittenCertificates(tuple(m.key_ids))),
    StepOperation(
        "list_objects", cards.ListObjects,
        lambda op: steps_pb2.ListObjects(),
        lambda m: cards.ListObjects(),
        "object_list", cards.ObjectListing,
        lambda v: steps_pb2.ObjectList(objects=[_object_to_proto(o) for o in v.objects]),
        lambda m: cards.ObjectListing(tuple(_object_from_proto(o) for o in m.objects))),
    StepOperation(
        "delete_objects", cards.DeleteObjects,
        lambda op: steps_pb2.DeleteObjects(key_id=op.key_id),
        lambda m: cards.DeleteObjects(m.key_id),
        "objects_deleted", cards.DeletedCount,
        lambda v: steps_pb2.ObjectsDeleted(count=v.count),
        lambda m: cards.DeletedCount(m.count)),
    StepOperation(
        "apdu_script", cards.RunApduScript,
        lambda op: steps_pb2.ApduScript(apdus=[steps_pb2.Apdu(command=a.command, expected_sw=list(a.expected_sw))
                                               for a in op.apdus]),
        lambda m: cards.RunApduScript(tuple(cards.Apdu(a.command, tuple(a.expected_sw) or ("9000",))
                                            for a in m.apdus)),
        "apdu_script_result", cards.ApduScriptResult,
        lambda v: steps_pb2.ApduScriptResult(responses=[steps_pb2.ApduResponse(data=r.data, sw=r.sw)
                                                        for r in v.responses]),
        lambda m: cards.ApduScriptResult(tuple(cards.ApduResponse(r.data, r.sw) for r in m.responses))),
    StepOperation(
        "read_card_info", cards.ReadCardInfo,
        lambda op: steps_pb2.ReadCardInfo(),
        lambda m: cards.ReadCardInfo(),
        "card_info", cards.Reader,
        lambda v: steps_pb2.CardInfo(reader=reader_to_proto(v)),
        lambda m: reader_from_proto(m.reader)),
    StepOperation(
        "import_key_pair", cards.ImportKeyPair,
        lambda op: steps_pb2.ImportKeyPair(key_id=op.key_id, label=op.label, private_key_der=op.private_key_der,
                                           certificate_der=op.certificate_der),
        _import_key_pair,
        "key_pair_imported", cards.KeyPairImported,
        lambda v: steps_pb2.KeyPairImported(key_id=v.key_id),
        lambda m: cards.KeyPairImported(m.key_id)),
    StepOperation(
        "set_pins", cards.SetPins,
        lambda op: steps_pb2.SetPins(new_user_pin=op.new_user_pin, new_so_pin=op.new_so_pin),
        _set_pins,
        "pins_set", cards.PinsSet,
        lambda v: steps_pb2.PinsSet(),
        lambda m: cards.PinsSet()),
    StepOperation(
        "write_data_object", cards.WriteDataObject,
        lambda op: steps_pb2.WriteDataObject(application=op.application, label=op.label, value=op.value,
                                             private=op.private),
        lambda m: cards.WriteDataObject(m.application, m.label, m.value, m.private),
        "data_object_written", cards.DataObjectWritten,
        lambda v: steps_pb2.DataObjectWritten(label=v.label),
        lambda m: cards.DataObjectWritten(m.label)),
)
_BY_FIELD = {o.field: o for o in STEP_OPERATIONS}
_BY_OPERATION = {o.operation: o for o in STEP_OPERATIONS}
_BY_RESULT_FIELD = {o.result_field: o for o in STEP_OPERATIONS}
_BY_VALUE = {o.value: o for o in STEP_OPERATIONS}


def _set_case(parent: Message, field: str, value: Message) -> None:
    sub = getattr(parent, field)
    sub.SetInParent()           # an empty message still selects its oneof case
    sub.CopyFrom(value)


def step_to_proto(step: cards.Step) -> steps_pb2.Step:
    msg = steps_pb2.Step(credentials=steps_pb2.Credentials(user_pin=step.user_pin, so_pin=step.so_pin))
    entry = _BY_OPERATION[type(step.operation)]
    _set_case(msg, entry.field, entry.to_proto(step.operation))
    return msg


def step_from_proto(msg: steps_pb2.Step) -> cards.Step:
    entry = _BY_FIELD.get(msg.WhichOneof("operation") or "")
    if entry is None:
        raise InvalidArgument("step has no operation", field="step.operation")
    op = entry.from_proto(getattr(msg, entry.field))
    return cards.Step(op, user_pin=msg.credentials.user_pin, so_pin=msg.credentials.so_pin)


def value_to_outcome(value: cards.StepValue) -> steps_pb2.StepOutcome:
    entry = _BY_VALUE.get(type(value))
    if entry is None:
        raise TypeError(f"not a step value: {value!r}")
    out = steps_pb2.StepOutcome()
    _set_case(out, entry.result_field, entry.value_to_proto(value))
    return out


def error_to_outcome(err: CardlineError) -> steps_pb2.StepOutcome:
    return steps_pb2.StepOutcome(error=error_to_proto(err))


def expected_result(operation: cards.Operation) -> str:
    """The outcome a step of OPERATION answers with: its StepOutcome field, e.g. "objects_deleted"."""
    return _BY_OPERATION[type(operation)].result_field


def result_of(value: cards.StepValue) -> str:
    """The StepOutcome field VALUE travels in (e.g. "card_info"); its class name if none."""
    entry = _BY_VALUE.get(type(value))
    return entry.result_field if entry is not None else type(value).__name__


def value_from_outcome(out: steps_pb2.StepOutcome) -> cards.StepValue:
    """The step's value, or raises the error the gateway reported."""
    which = out.WhichOneof("result")
    if which == "error":
        raise error_from_proto(out.error)
    entry = _BY_RESULT_FIELD.get(which or "")
    if entry is None:
        raise InvalidArgument("step outcome is empty", field="outcome")
    return entry.value_from_proto(getattr(out, entry.result_field))


_EVENT_TYPES = {
    "present": gateway_pb2.READER_EVENT_TYPE_PRESENT,
    "inserted": gateway_pb2.READER_EVENT_TYPE_CARD_INSERTED,
    "removed": gateway_pb2.READER_EVENT_TYPE_CARD_REMOVED,
    "reader_added": gateway_pb2.READER_EVENT_TYPE_READER_ADDED,
    "reader_removed": gateway_pb2.READER_EVENT_TYPE_READER_REMOVED,
}
_EVENT_TYPES_BACK = {v: k for k, v in _EVENT_TYPES.items()}


def reader_event_to_proto(kind: str, reader: cards.Reader) -> gateway_pb2.ReaderEvent:
    return gateway_pb2.ReaderEvent(type=_EVENT_TYPES[kind], reader=reader_to_proto(reader))


def reader_event_from_proto(m: gateway_pb2.ReaderEvent) -> tuple[str, cards.Reader]:
    return _EVENT_TYPES_BACK.get(m.type, "present"), reader_from_proto(m.reader)
