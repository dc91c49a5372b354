"""The error catalogue: static classes with typed fields, and one way to data and back
(to_details/from_details) that the link's common.v1.Error and the gRPC status both use."""
from __future__ import annotations

import asyncio
import inspect
import pickle
import threading
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shared.errors as errors_module
from shared import convert
from shared.cards import ApduResponse
from shared.errors import (
    CATALOGUE,
    CardError,
    CardlineError,
    PinError,
    PinIncorrect,
    UnexpectedStatusWord,
    from_details,
    from_reason,
)
from shared.proto import common_pb2
from shared.rpc import error_from_rpc, rpc_errors
from tests.support.error_strategies import any_error, errors, same_error

CLASSES = sorted(CATALOGUE.values(), key=lambda c: c.reason)


def test_catalogue_classes_are_static_module_classes_with_a_grpc_code():
    assert len(CLASSES) >= 31
    for cls in CLASSES:
        assert getattr(errors_module, cls.__name__) is cls, cls      # visible to editors and type checkers
        assert inspect.getsource(cls).startswith(f"class {cls.__name__}(")
        assert cls.code in grpc.StatusCode.__members__, cls
    assert len({cls.__name__ for cls in CLASSES}) == len(CLASSES)


def test_families_group_the_classes():
    assert issubclass(PinIncorrect, PinError) and issubclass(PinError, CardError)
    assert issubclass(UnexpectedStatusWord, errors_module.ApduError)
    assert issubclass(errors_module.CaRefused, errors_module.CaError)
    assert issubclass(errors_module.IllegalTransition, errors_module.StoreError)
    assert issubclass(errors_module.PermissionDenied, errors_module.AuthError)
    assert issubclass(errors_module.TemplateNotFound, errors_module.ConfigError)


def test_typed_fields_are_converted_from_the_keywords_code_raises_with():
    err = PinIncorrect("wrong user PIN", slot_id="5", attempts_remaining="1", token_label="alice")
    assert err.attempts_remaining == 1 and err.slot_id == 5
    assert err.context == {"token_label": "alice"}
    assert PinIncorrect("wrong user PIN").attempts_remaining is None
    sw = UnexpectedStatusWord("APDU 1 answered 6A82", index=1, sw=0x6A82,
                              responses=[ApduResponse(b"\x6f\x00", 0x9000), ApduResponse(b"", 0x6A82)])
    assert sw.responses == (ApduResponse(b"\x6f\x00", 0x9000), ApduResponse(b"", 0x6A82))


def test_bad_field_values_are_refused_naming_class_and_field():
    with pytest.raises(TypeError, match=r"PinIncorrect\.attempts_remaining: expected an integer"):
        PinIncorrect("wrong PIN", attempts_remaining="many")
    with pytest.raises(TypeError, match="UnexpectedStatusWord needs index, sw"):
        UnexpectedStatusWord("no index")
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        UnexpectedStatusWord("x", index=0, sw=0x6A82, responses=["9000"])


@given(any_error)
def test_every_catalogue_error_round_trips_through_its_details(err: CardlineError):
    back = from_details(err.reason, err.message, err.to_details())
    assert same_error(err, back)


@given(any_error)
def test_every_catalogue_error_round_trips_through_the_link_message(err: CardlineError):
    wire = convert.error_to_proto(err).SerializeToString()
    assert same_error(err, convert.error_from_proto(common_pb2.Error.FromString(wire)))


@given(any_error)
def test_every_catalogue_error_round_trips_through_a_step_outcome(err: CardlineError):
    outcome = convert.error_to_outcome(err)
    with pytest.raises(CardlineError) as raised:
        convert.value_from_outcome(outcome)
    assert same_error(err, raised.value)


@given(any_error)
def test_every_catalogue_error_round_trips_through_pickle(err: CardlineError):
    assert same_error(err, pickle.loads(pickle.dumps(err)))


@given(st.sampled_from(CLASSES).flatmap(errors))
def test_text_metadata_alone_rebuilds_the_typed_fields(err: CardlineError):
    """Senders without typed details (ErrorInfo, rows before revision 0004) still give the class."""
    back = from_reason(err.reason, err.message, err.metadata)
    assert same_error(err, back)


def test_an_unknown_reason_keeps_reason_message_and_details():
    err = from_details("NEWER_PEERS_REASON", "something new", {"count": 3, "what": "x"})
    assert type(err) is CardlineError and err.reason == "NEWER_PEERS_REASON"
    assert err.context == {"count": "3", "what": "x"}


def test_details_that_do_not_fit_the_class_keep_reason_and_text():
    err = from_details("PIN_INCORRECT", "wrong PIN", {"attempts_remaining": "many"})
    assert type(err) is CardlineError and err.reason == "PIN_INCORRECT" and err.message == "wrong PIN"
    assert err.context["attempts_remaining"] == "many"
    assert "PinIncorrect.attempts_remaining" in err.context["details_error"]


# --- through a real gRPC status -------------------------------------------------------------

class _Raiser:
    """An in-process gRPC service whose one method raises the error the test left for it."""

    def __init__(self) -> None:
        self.pending: dict[bytes, BaseException] = {}

    @rpc_errors
    async def Raise(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise self.pending.pop(request)


@pytest.fixture(scope="module")
def raiser() -> Iterator[tuple[_Raiser, grpc.Channel]]:
    servicer = _Raiser()
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()
    port: list[int] = []

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(servicer.Raise)})])
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the test gRPC server did not start"
    with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
        yield servicer, channel
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


def _through_status(raiser: tuple[_Raiser, grpc.Channel], err: BaseException) -> grpc.RpcError:
    servicer, channel = raiser
    key = str(id(err)).encode()
    servicer.pending[key] = err
    with pytest.raises(grpc.RpcError) as caught:
        raise_rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Errors/Raise")
        raise_rpc(key, timeout=10)
    return caught.value


@settings(max_examples=60, deadline=None)
@given(any_error)
def test_every_catalogue_error_round_trips_through_a_grpc_status(raiser, err: CardlineError):
    status = _through_status(raiser, err)
    assert status.code() == grpc.StatusCode[err.code]
    assert same_error(err, error_from_rpc(status))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_completeness_each_catalogue_class_crosses_a_grpc_status_as_itself(raiser, cls):
    err = cls(f"a {cls.__name__}", **{name: _sample(f.kind) for name, f in cls._fields.items()})
    back = error_from_rpc(_through_status(raiser, err))
    assert type(back) is cls and same_error(err, back)


def test_pin_incorrect_attempts_remaining_is_an_int_on_the_client(raiser):
    back = error_from_rpc(_through_status(raiser, PinIncorrect("wrong user PIN", attempts_remaining="1")))
    assert isinstance(back, PinIncorrect) and back.attempts_remaining == 1
    assert type(back.attempts_remaining) is int


def test_anything_else_is_internal_without_its_text(raiser):
    status = _through_status(raiser, RuntimeError("secret 123456"))
    back = error_from_rpc(status)
    assert status.code() == grpc.StatusCode.INTERNAL and type(back) is CardlineError
    assert "123456" not in back.message


def _sample(kind: object) -> object:
    samples: dict[object, object] = {int: 7, str: "text"}
    return samples.get(kind, (ApduResponse(b"\x90", 0x9000), ApduResponse(b"", 0x6A82)))
