"""A failed card task keeps its error intact in the store (reason, message and typed details,
revision 0004): card_tasks and the API give back the same class with the same attributes."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from orchestrator.api.convert import task_to_proto
from orchestrator.services.card_tasks import task_error
from orchestrator.store import Store
from shared import convert
from shared.cards import ApduResponse
from shared.errors import CardlineError, PinIncorrect, UnexpectedStatusWord
from shared.proto import card_service_pb2
from tests.support.error_strategies import any_error, same_error

_ONE_STORE_MANY_TASKS = settings(max_examples=40, deadline=None,
                                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _failed_task(store: Store, err: CardlineError):
    task = store.tasks.create("card_operation", "gw1", "r1")
    store.finish_task_failed(task.id, err.reason, err.message, details=err.to_details())
    return store.tasks.get(task.id)


@_ONE_STORE_MANY_TASKS
@given(err=any_error)
def test_every_catalogue_error_of_a_failed_task_comes_back_from_the_store(store: Store, err: CardlineError):
    back = task_error(_failed_task(store, err))
    assert back is not None and same_error(err, back)


@_ONE_STORE_MANY_TASKS
@given(err=any_error)
def test_every_catalogue_error_of_a_failed_task_comes_back_through_the_api(store: Store, err: CardlineError):
    wire = task_to_proto(_failed_task(store, err), []).SerializeToString()
    assert same_error(err, convert.error_from_proto(card_service_pb2.Task.FromString(wire).error))


def test_apdu_responses_and_pin_counter_survive_the_task_row(store: Store):
    sw = UnexpectedStatusWord("APDU 1 answered 6A82, expected 9000", index=1, sw=0x6A82, reader_id="pcsc:r",
                              responses=[ApduResponse(bytes.fromhex("6F10"), 0x9000), ApduResponse(b"", 0x6A82)])
    back = task_error(_failed_task(store, sw))
    assert isinstance(back, UnexpectedStatusWord)
    assert back.responses == (ApduResponse(bytes.fromhex("6F10"), 0x9000), ApduResponse(b"", 0x6A82))
    pin = task_error(_failed_task(store, PinIncorrect("wrong user PIN", attempts_remaining=2)))
    assert isinstance(pin, PinIncorrect) and pin.attempts_remaining == 2


def test_a_task_failed_without_details_is_rebuilt_from_reason_and_message(store: Store):
    """Rows written before revision 0004 (and callers that pass no details)."""
    task = store.tasks.create("card_operation", "gw1", "r1")
    store.finish_task_failed(task.id, "PIN_LOCKED", "the user PIN is blocked")
    back = task_error(store.tasks.get(task.id))
    assert back is not None and type(back).__name__ == "PinLocked" and back.message == "the user PIN is blocked"
    assert task_error(store.tasks.create("card_operation", "gw1", "r2")) is None
