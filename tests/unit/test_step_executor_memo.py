"""The executor remembers a step under its caller, reader, operation, task id and step number
(gateway/core/executor.py): only the same caller resending the same step is answered from
the memo. The card I/O is replaced by a counter (monkeypatched `_dispatch`): the rule is the
key, not the drivers, which tests/integration/test_step_memo_callers.py runs for real."""
from __future__ import annotations

import asyncio

import pytest

from gateway.core.executor import LinkCaller, StepExecutor
from gateway.core.registry import ReaderRegistry
from shared import cards
from shared.tls import PeerIdentity

ALICE, MALLORY = PeerIdentity("admin", "alice", 1), PeerIdentity("admin", "mallory", 2)
LINK = LinkCaller("127.0.0.1:7400")


@pytest.fixture
def executor(monkeypatch) -> tuple[StepExecutor, list[tuple[str, str]]]:
    ran: list[tuple[str, str]] = []
    executor = StepExecutor(ReaderRegistry(token_drivers=[], pcsc=None))

    async def dispatch(reader_id: str, step: cards.Step) -> cards.StepValue:
        ran.append((reader_id, type(step.operation).__name__))
        return cards.DeletedCount(len(ran))

    monkeypatch.setattr(executor, "_dispatch", dispatch)
    return executor, ran


def run_all(executor: StepExecutor, *calls) -> list[tuple[cards.StepValue, bool]]:
    async def main():
        return [await executor.run(reader, cards.Step(op), "task-1", 1, caller=caller) for caller, reader, op in calls]
    return asyncio.run(main())


def test_step_memo_answers_the_same_callers_resent_step(executor):
    ex, ran = executor
    answers = run_all(ex, (LINK, "r1", cards.ListObjects()), (LINK, "r1", cards.ListObjects()))
    assert answers == [(cards.DeletedCount(1), False), (cards.DeletedCount(1), True)]
    assert len(ran) == 1


def test_step_memo_keeps_each_caller_apart(executor):
    ex, ran = executor
    answers = run_all(ex, (MALLORY, "r1", cards.ListObjects()), (LINK, "r1", cards.ListObjects()),
                      (ALICE, "r1", cards.ListObjects()), (None, "r1", cards.ListObjects()))
    assert [replayed for _, replayed in answers] == [False] * 4
    assert len(ran) == 4


def test_step_memo_runs_a_step_naming_another_reader_or_operation(executor):
    ex, ran = executor
    answers = run_all(ex, (LINK, "r1", cards.ReadCardInfo()), (LINK, "r1", cards.DeleteObjects(b"k")),
                      (LINK, "r2", cards.DeleteObjects(b"k")))
    assert [replayed for _, replayed in answers] == [False] * 3
    assert ran == [("r1", "ReadCardInfo"), ("r1", "DeleteObjects"), ("r2", "DeleteObjects")]


def test_step_memo_answers_a_step_resent_by_another_orchestrator_replica(executor):
    """A replica that took a dead one's task over resends its steps through a link to another
    address: every link is mutual TLS to an orchestrator of the deployment, one caller."""
    ex, ran = executor
    answers = run_all(ex, (LinkCaller("127.0.0.1:7400"), "r1", cards.ListObjects()),
                      (LinkCaller("10.0.0.2:7400"), "r1", cards.ListObjects()),
                      (PeerIdentity("orchestrator", "orchestrator", 3), "r1", cards.ListObjects()))
    assert answers[:2] == [(cards.DeletedCount(1), False), (cards.DeletedCount(1), True)]
    assert answers[2][1] is False          # a direct caller with an orchestrator certificate is not the link
    assert len(ran) == 2
