"""Steps and their results survive the trip through protobuf unchanged; bad ones are named."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import cards, convert
from shared.errors import InvalidArgument, PinIncorrect
from shared.proto import steps_pb2

key_types = st.sampled_from(list(cards.KeyType))
apdus = st.builds(cards.Apdu, st.binary(min_size=4, max_size=40),
                  st.lists(st.sampled_from(["9000", "61XX", "63CX"]), min_size=1, max_size=3).map(tuple))
operations = st.one_of(
    st.builds(cards.GenerateKeyPair, key_types, st.text(max_size=20), st.binary(min_size=1, max_size=20),
              st.text(max_size=30)),
    st.builds(cards.Sign, st.binary(max_size=20), st.sampled_from(list(cards.SignatureAlgorithm)), st.binary()),
    st.builds(cards.WriteCertificates, st.lists(st.builds(cards.CertificateObject, st.binary(max_size=8),
                                                          st.text(max_size=8), st.binary(max_size=64)),
                                                max_size=3).map(tuple)),
    st.just(cards.ListObjects()), st.builds(cards.DeleteObjects, st.binary(max_size=8)),
    st.builds(cards.RunApduScript, st.lists(apdus, max_size=5).map(tuple)), st.just(cards.ReadCardInfo()),
    st.builds(cards.ImportKeyPair, st.binary(min_size=1, max_size=8), st.text(max_size=8), st.binary(min_size=1)),
    st.builds(cards.SetPins, st.text(min_size=1, max_size=8), st.text(max_size=8)),
    st.builds(cards.WriteDataObject, st.text(max_size=8), st.text(max_size=8), st.binary(), st.booleans()),
)


@given(operations, st.text(max_size=12), st.text(max_size=12))
def test_step_round_trips_through_protobuf(operation, pin, so_pin):
    step = cards.Step(operation, user_pin=pin, so_pin=so_pin)
    assert convert.step_from_proto(convert.step_to_proto(step)) == step


def test_step_repr_never_shows_pins_or_private_keys():
    step = cards.Step(cards.ImportKeyPair(b"k", "l", b"PRIVATE-KEY-BYTES"), user_pin="123456", so_pin="87654321")
    assert "123456" not in repr(step) and "87654321" not in repr(step) and "PRIVATE" not in repr(step)
    assert "999999" not in repr(cards.SetPins("999999"))


def test_step_without_operation_is_rejected_by_field():
    with pytest.raises(InvalidArgument, match="step has no operation"):
        convert.step_from_proto(steps_pb2.Step())


def test_unspecified_key_type_is_rejected_by_field():
    msg = steps_pb2.Step(generate_key_pair=steps_pb2.GenerateKeyPair(key_id=b"1"))
    with pytest.raises(InvalidArgument) as err:
        convert.step_from_proto(msg)
    assert err.value.metadata["field"] == "generate_key_pair.key_type"


def test_error_outcome_raises_the_catalogue_error_with_metadata():
    outcome = convert.error_to_outcome(PinIncorrect("PIN refused", attempts_remaining="2"))
    with pytest.raises(PinIncorrect) as err:
        convert.value_from_outcome(outcome)
    assert err.value.metadata == {"attempts_remaining": "2"}


@pytest.mark.parametrize("value", [
    cards.GeneratedKey(b"k", b"spki", b"csr"), cards.Signature(b"sig"), cards.WrittenCertificates((b"a", b"b")),
    cards.ObjectListing((cards.StoredObject(cards.ObjectClass.PRIVATE_KEY, b"k", "l", cards.KeyType.EC_P256),)),
    cards.DeletedCount(3), cards.ApduScriptResult((cards.ApduResponse(b"\x01", 0x9000),)),
    cards.Reader("pcsc:r", cards.ReaderKind.PCSC, "r", True, atr=b"\x3b"),
    cards.KeyPairImported(b"k"), cards.PinsSet(), cards.DataObjectWritten("label"),
])
def test_step_values_round_trip(value):
    assert convert.value_from_outcome(convert.value_to_outcome(value)) == value


def test_every_step_operation_in_steps_proto_has_one_row_in_the_table():
    """A `oneof` case added to steps.proto without a row in convert.STEP_OPERATIONS (and a
    value, and a way to run it on a gateway) fails here."""
    from gateway.core.executor import PCSC_OPERATIONS, READER_OPERATIONS, TOKEN_OPERATIONS

    operation_cases = {f.name for f in steps_pb2.Step.DESCRIPTOR.oneofs_by_name["operation"].fields}
    result_cases = {f.name for f in steps_pb2.StepOutcome.DESCRIPTOR.oneofs_by_name["result"].fields} - {"error"}
    rows = convert.STEP_OPERATIONS
    assert sorted(r.field for r in rows) == sorted(operation_cases)
    assert sorted(r.result_field for r in rows) == sorted(result_cases)
    assert {r.operation for r in rows} == set(cards.Operation.__args__)
    assert {r.value for r in rows} == set(cards.StepValue.__args__)
    for row in rows:
        runs = [row.operation in TOKEN_OPERATIONS, row.operation in PCSC_OPERATIONS,
                row.operation in READER_OPERATIONS]
        assert any(runs), f"{row.field}: no gateway runs it (gateway/core/executor.py)"
    assert set(TOKEN_OPERATIONS) | PCSC_OPERATIONS | READER_OPERATIONS == {r.operation for r in rows}
