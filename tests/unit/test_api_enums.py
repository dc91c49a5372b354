"""Every value the orchestrator reports maps to a member of its API enum (docs/api.md), and
every member but _UNSPECIFIED is reachable: a state or kind added on one side only fails here."""
import pytest

from orchestrator.api import convert
from orchestrator.domain.processes import TASK_TYPES
from orchestrator.services import orders
from orchestrator.services.pool import ReaderState
from orchestrator.store.records import CaRequestState, ProcessState, TaskState
from shared.proto import (
    ca_service_pb2,
    card_service_pb2,
    order_service_pb2,
    process_service_pb2,
    reader_pool_service_pb2,
)

CASES = [
    (card_service_pb2.TaskType, {convert.task_type_to_proto(t) for t in TASK_TYPES}),
    (card_service_pb2.TaskState, {convert._TASK_STATES[s] for s in TaskState}),
    (process_service_pb2.ProcessState, {convert._PROCESS_STATES[s] for s in ProcessState}),
    (reader_pool_service_pb2.PooledReaderState, {convert._READER_STATES[s] for s in ReaderState}),
    (order_service_pb2.OrderState, set(convert._ORDER_STATES.values())),
    (order_service_pb2.OrderCardState,
     {convert._ORDER_CARD_STATES[s] for s in (orders.QUEUED, orders.RUNNING, orders.SUCCEEDED, orders.FAILED)}),
    (ca_service_pb2.CaRequestState, {convert._CA_REQUEST_STATES[s] for s in CaRequestState}),
]


@pytest.mark.parametrize(("enum", "reached"), CASES, ids=[e.DESCRIPTOR.name for e, _ in CASES])
def test_api_enum_covers_every_value_the_orchestrator_reports(enum, reached):
    members = {v for n, v in enum.items() if not n.endswith("_UNSPECIFIED")}
    assert reached == members, {enum.Name(v) for v in members ^ reached}


def test_unknown_task_type_is_refused_not_sent_as_unspecified():
    with pytest.raises(ValueError):
        convert.task_type_to_proto("teleport")
