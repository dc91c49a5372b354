"""Explicit conversion between shared/cards.py values and protobuf messages.

Only edges (servicers, the gateway link, clients) call these; everything behind them works
on plain dataclasses.
"""
from __future__ import annotations

from shared import cards
from shared.errors import CardlineError, InvalidArgument, from_reason
from shared.proto import common_pb2, gateway_pb2, steps_pb2

_KEY_TYPES = {
    cards.KeyType.EC_P256: common_pb2.KEY_TYPE_EC_P256,
    cards.KeyType.RSA_2048: common_pb2.KEY_TYPE_RSA_2048,
    cards.KeyType.RSA_3072: common_pb2.KEY_TYPE_RSA_3072,
}
_KEY_TYPES_BACK = {v: k for k, v in _KEY_TYPES.items()}
_ALGORITHMS = {
    cards.SignatureAlgorithm.ECDSA_SHA256: common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
    cards.SignatureAlgorithm.RSA_PKCS1_SHA256: common_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256,
}
_ALGORITHMS_BACK = {v: k for k, v in _ALGORITHMS.items()}
_KINDS = {cards.ReaderKind.PCSC: common_pb2.READER_KIND_PCSC, cards.ReaderKind.PKCS11: common_pb2.READER_KIND_PKCS11}
_KINDS_BACK = {v: k for k, v in _KINDS.items()}
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
    return common_pb2.Error(reason=err.reason, message=err.message, metadata=err.metadata)


def error_from_proto(m: common_pb2.Error) -> CardlineError:
    return from_reason(m.reason, m.message, dict(m.metadata))


# --- steps -----------------------------------------------------------------------------

def step_to_proto(step: cards.Step) -> steps_pb2.Step:
    msg = steps_pb2.Step(credentials=steps_pb2.Credentials(user_pin=step.user_pin, so_pin=step.so_pin))
    op = step.operation
    match op:
        case cards.GenerateKeyPair():
            msg.generate_key_pair.CopyFrom(steps_pb2.GenerateKeyPair(
                key_type=_KEY_TYPES[op.key_type], label=op.label, key_id=op.key_id, csr_subject=op.csr_subject))
        case cards.Sign():
            msg.sign.CopyFrom(steps_pb2.Sign(key_id=op.key_id, algorithm=_ALGORITHMS[op.algorithm], data=op.data))
        case cards.WriteCertificates():
            msg.write_certificates.CopyFrom(steps_pb2.WriteCertificates(certificates=[
                steps_pb2.CertificateObject(key_id=c.key_id, label=c.label, certificate_der=c.certificate_der)
                for c in op.certificates]))
        case cards.ListObjects():
            msg.list_objects.SetInParent()
        case cards.DeleteObjects():
            msg.delete_objects.CopyFrom(steps_pb2.DeleteObjects(key_id=op.key_id))
        case cards.RunApduScript():
            msg.apdu_script.CopyFrom(steps_pb2.ApduScript(apdus=[
                steps_pb2.Apdu(command=a.command, expected_sw=list(a.expected_sw)) for a in op.apdus]))
        case cards.ReadCardInfo():
            msg.read_card_info.SetInParent()
        case cards.ImportKeyPair():
            msg.import_key_pair.CopyFrom(steps_pb2.ImportKeyPair(
                key_id=op.key_id, label=op.label, private_key_der=op.private_key_der, certificate_der=op.certificate_der))
        case cards.SetPins():
            msg.set_pins.CopyFrom(steps_pb2.SetPins(new_user_pin=op.new_user_pin, new_so_pin=op.new_so_pin))
        case cards.WriteDataObject():
            msg.write_data_object.CopyFrom(steps_pb2.WriteDataObject(
                application=op.application, label=op.label, value=op.value, private=op.private))
    return msg


def step_from_proto(msg: steps_pb2.Step) -> cards.Step:
    which = msg.WhichOneof("operation")
    op: cards.Operation
    if which == "generate_key_pair":
        m = msg.generate_key_pair
        if not m.key_id:
            raise InvalidArgument("generate_key_pair.key_id is empty", field="generate_key_pair.key_id")
        op = cards.GenerateKeyPair(key_type_from_proto(m.key_type, "generate_key_pair.key_type"),
                                   m.label, m.key_id, m.csr_subject)
    elif which == "sign":
        m = msg.sign
        if m.algorithm not in _ALGORITHMS_BACK:
            raise InvalidArgument("sign.algorithm is unspecified", field="sign.algorithm")
        op = cards.Sign(m.key_id, _ALGORITHMS_BACK[m.algorithm], m.data)
    elif which == "write_certificates":
        op = cards.WriteCertificates(tuple(cards.CertificateObject(c.key_id, c.label, c.certificate_der)
                                           for c in msg.write_certificates.certificates))
    elif which == "list_objects":
        op = cards.ListObjects()
    elif which == "delete_objects":
        op = cards.DeleteObjects(msg.delete_objects.key_id)
    elif which == "apdu_script":
        op = cards.RunApduScript(tuple(cards.Apdu(a.command, tuple(a.expected_sw) or ("9000",))
                                       for a in msg.apdu_script.apdus))
    elif which == "read_card_info":
        op = cards.ReadCardInfo()
    elif which == "import_key_pair":
        m = msg.import_key_pair
        if not m.key_id or not m.private_key_der:
            raise InvalidArgument("import_key_pair needs key_id and private_key_der", field="import_key_pair")
        op = cards.ImportKeyPair(m.key_id, m.label, m.private_key_der, m.certificate_der)
    elif which == "set_pins":
        if not msg.set_pins.new_user_pin and not msg.set_pins.new_so_pin:
            raise InvalidArgument("set_pins sets no PIN", field="set_pins")
        op = cards.SetPins(msg.set_pins.new_user_pin, msg.set_pins.new_so_pin)
    elif which == "write_data_object":
        m = msg.write_data_object
        op = cards.WriteDataObject(m.application, m.label, m.value, m.private)
    else:
        raise InvalidArgument("step has no operation", field="step.operation")
    return cards.Step(op, user_pin=msg.credentials.user_pin, so_pin=msg.credentials.so_pin)


def value_to_outcome(value: cards.StepValue) -> steps_pb2.StepOutcome:
    out = steps_pb2.StepOutcome()
    match value:
        case cards.GeneratedKey():
            out.key_pair_generated.CopyFrom(steps_pb2.KeyPairGenerated(
                key_id=value.key_id, public_key_der=value.public_key_der, csr_der=value.csr_der))
        case cards.Signature():
            out.signed.CopyFrom(steps_pb2.Signed(signature=value.signature))
        case cards.WrittenCertificates():
            out.certificates_written.CopyFrom(steps_pb2.CertificatesWritten(key_ids=list(value.key_ids)))
        case cards.ObjectListing():
            out.object_list.CopyFrom(steps_pb2.ObjectList(objects=[
                steps_pb2.TokenObject(object_class=_CLASSES[o.object_class], key_id=o.key_id, label=o.label,
                                      key_type=_KEY_TYPES.get(o.key_type, 0) if o.key_type else 0,
                                      certificate_der=o.certificate_der)
                for o in value.objects]))
        case cards.DeletedCount():
            out.objects_deleted.CopyFrom(steps_pb2.ObjectsDeleted(count=value.count))
        case cards.ApduScriptResult():
            out.apdu_script_result.CopyFrom(steps_pb2.ApduScriptResult(responses=[
                steps_pb2.ApduResponse(data=r.data, sw=r.sw) for r in value.responses]))
        case cards.Reader():
            out.card_info.CopyFrom(steps_pb2.CardInfo(reader=reader_to_proto(value)))
        case cards.KeyPairImported():
            out.key_pair_imported.CopyFrom(steps_pb2.KeyPairImported(key_id=value.key_id))
        case cards.PinsSet():
            out.pins_set.SetInParent()
        case cards.DataObjectWritten():
            out.data_object_written.CopyFrom(steps_pb2.DataObjectWritten(label=value.label))
        case _:
            raise TypeError(f"not a step value: {value!r}")
    return out


def error_to_outcome(err: CardlineError) -> steps_pb2.StepOutcome:
    return steps_pb2.StepOutcome(error=error_to_proto(err))


def value_from_outcome(out: steps_pb2.StepOutcome) -> cards.StepValue:
    """The step's value, or raises the error the gateway reported."""
    which = out.WhichOneof("result")
    if which == "error":
        raise error_from_proto(out.error)
    if which == "key_pair_generated":
        m = out.key_pair_generated
        return cards.GeneratedKey(m.key_id, m.public_key_der, m.csr_der)
    if which == "signed":
        return cards.Signature(out.signed.signature)
    if which == "certificates_written":
        return cards.WrittenCertificates(tuple(out.certificates_written.key_ids))
    if which == "object_list":
        return cards.ObjectListing(tuple(
            cards.StoredObject(_CLASSES_BACK[o.object_class], o.key_id, o.label,
                               _KEY_TYPES_BACK.get(o.key_type), o.certificate_der)
            for o in out.object_list.objects))
    if which == "objects_deleted":
        return cards.DeletedCount(out.objects_deleted.count)
    if which == "apdu_script_result":
        return cards.ApduScriptResult(tuple(cards.ApduResponse(r.data, r.sw)
                                            for r in out.apdu_script_result.responses))
    if which == "card_info":
        return reader_from_proto(out.card_info.reader)
    if which == "key_pair_imported":
        return cards.KeyPairImported(out.key_pair_imported.key_id)
    if which == "pins_set":
        return cards.PinsSet()
    if which == "data_object_written":
        return cards.DataObjectWritten(out.data_object_written.label)
    raise InvalidArgument("step outcome is empty", field="outcome")


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
