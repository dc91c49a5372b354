"""The step memo kept in the gateway's data directory (gateway/core/idempotency.py,
docs/stations.md "Step memo"): a finished step is answered from the file after a restart,
the file holds at most the memo's capacity, is private to the gateway (0600), holds no
credentials, and an unreadable file is set aside for a fresh memo with a warning. The card
is a counter here; tests/integration/test_step_memo_restart.py kills a real gateway."""
from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import stat

import pytest

from gateway.core.executor import LinkCaller, StepExecutor
from gateway.core.idempotency import STEP_MEMO_FILE, PersistedSteps, StepMemo
from gateway.core.registry import ReaderRegistry
from shared import cards
from shared.errors import ConfigurationError, PinAttemptsThrottled, PinIncorrect
from shared.tls import PeerIdentity

LINK = LinkCaller("127.0.0.1:7400")
USER_PIN, NEW_PIN = "pin-4711-secret", "pin-0815-secret"


class Card:
    """Counts the steps that reach it; its answer changes with every run."""
    def __init__(self) -> None:
        self.runs = 0

    async def generate(self) -> cards.GeneratedKey:
        self.runs += 1
        return cards.GeneratedKey(b"k1", f"public key #{self.runs}".encode(), b"")


def memo_at(path: pathlib.Path, capacity: int = 10_000) -> tuple[StepMemo, PersistedSteps]:
    store = PersistedSteps(path / STEP_MEMO_FILE, capacity)
    return StepMemo(capacity, store), store


def run(memo: StepMemo, key, work):
    return asyncio.run(memo.run(key, work))


def test_step_memo_file_answers_a_step_resent_after_a_restart(tmp_path):
    card = Card()
    memo, store = memo_at(tmp_path)
    first = run(memo, ("t", 1), card.generate)
    store.close()                                   # the gateway restarts: a new memo on the same file
    memo, store = memo_at(tmp_path)
    resent, other = run(memo, ("t", 1), card.generate), run(memo, ("t", 2), card.generate)
    store.close()
    assert first == (cards.GeneratedKey(b"k1", b"public key #1", b""), False)
    assert resent == (first[0], True)
    assert other == (cards.GeneratedKey(b"k1", b"public key #2", b""), False)
    assert card.runs == 2


def test_step_memo_file_answers_a_remembered_error_again_after_a_restart(tmp_path):
    runs = []

    async def wrong_pin():
        runs.append(1)
        raise PinIncorrect("wrong PIN", attempts_remaining="2")

    memo, store = memo_at(tmp_path)
    with pytest.raises(PinIncorrect):
        run(memo, ("t", 1), wrong_pin)
    store.close()
    memo, store = memo_at(tmp_path)
    with pytest.raises(PinIncorrect) as again:
        run(memo, ("t", 1), wrong_pin)
    store.close()
    assert runs == [1] and again.value.metadata.get("attempts_remaining") == "2"


def test_step_memo_file_keeps_no_throttled_step(tmp_path):
    """A throttled step never reached the card: after a restart it may try again."""
    runs = []

    async def throttled():
        runs.append(1)
        raise PinAttemptsThrottled("wait", retry_after_ms="100")

    memo, store = memo_at(tmp_path)
    with pytest.raises(PinAttemptsThrottled):
        run(memo, ("t", 1), throttled)
    count = store.count()
    store.close()
    assert count == 0 and runs == [1]


def test_step_memo_file_keeps_the_memos_bound_dropping_the_oldest(tmp_path):
    card = Card()
    memo, store = memo_at(tmp_path, capacity=3)
    for n in range(5):
        run(memo, ("t", n), card.generate)
    count = store.count()
    store.close()
    memo, store = memo_at(tmp_path, capacity=3)
    newest, oldest = run(memo, ("t", 4), card.generate), run(memo, ("t", 1), card.generate)
    store.close()
    assert count == 3
    assert newest[1] is True                    # kept on disk
    assert oldest == (cards.GeneratedKey(b"k1", b"public key #6", b""), False)   # dropped: runs again


def test_step_memo_file_and_its_journal_are_private_to_the_gateway(tmp_path):
    memo, store = memo_at(tmp_path)
    run(memo, ("t", 1), Card().generate)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    store.close()
    assert STEP_MEMO_FILE in modes and f"{STEP_MEMO_FILE}-wal" in modes
    assert set(modes.values()) == {0o600}, modes


def test_step_memo_file_holds_no_credentials_of_the_step(tmp_path):
    """The PINs travel in the step; only its outcome is kept (a SetPins step's new PINs too)."""
    executor = StepExecutor(ReaderRegistry(token_drivers=[], pcsc=None), memo_at(tmp_path)[0])

    async def dispatch(reader_id: str, step: cards.Step) -> cards.StepValue:
        return cards.PinsSet()

    executor._dispatch = dispatch  # type: ignore[method-assign]
    step = cards.Step(cards.SetPins(NEW_PIN, ""), user_pin=USER_PIN, so_pin=USER_PIN)
    asyncio.run(executor.run("r1", step, "task-1", 1, caller=PeerIdentity("admin", "alice", 7)))
    asyncio.run(executor.run("r1", step, "task-1", 2, caller=LINK))
    executor.memo._store.close()  # type: ignore[union-attr]
    kept = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"task-1" in kept                            # the rows are there ...
    assert USER_PIN.encode() not in kept and NEW_PIN.encode() not in kept   # ... without any PIN


def test_step_memo_file_keeps_each_caller_apart_after_a_restart(tmp_path):
    ran: list[str] = []

    def executor() -> StepExecutor:
        ex = StepExecutor(ReaderRegistry(token_drivers=[], pcsc=None), memo_at(tmp_path)[0])

        async def dispatch(reader_id: str, step: cards.Step) -> cards.StepValue:
            ran.append(reader_id)
            return cards.DeletedCount(len(ran))

        ex._dispatch = dispatch  # type: ignore[method-assign]
        return ex

    async def send(ex: StepExecutor, caller):
        return await ex.run("r1", cards.Step(cards.DeleteObjects(b"k")), "task-1", 1, caller=caller)

    first = executor()
    asyncio.run(send(first, LINK))
    first.memo._store.close()  # type: ignore[union-attr]
    second = executor()
    link, mallory = asyncio.run(send(second, LINK)), asyncio.run(send(second, PeerIdentity("admin", "link", 1)))
    second.memo._store.close()  # type: ignore[union-attr]
    assert link == (cards.DeletedCount(1), True)
    assert mallory == (cards.DeletedCount(2), False)


@pytest.mark.parametrize("content", [b"not a database at all " * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
                         ids=["garbage", "damaged-header"])
def test_step_memo_file_unreadable_is_set_aside_for_a_fresh_memo_with_a_warning(tmp_path, content, capsys):
    (tmp_path / STEP_MEMO_FILE).write_bytes(content)
    card = Card()
    memo, store = memo_at(tmp_path)
    answer = run(memo, ("t", 1), card.generate)
    store.close()
    logged = capsys.readouterr()
    assert answer[1] is False and card.runs == 1
    assert (tmp_path / f"{STEP_MEMO_FILE}.unreadable").read_bytes() == content
    assert "step memo file is unreadable" in logged.out + logged.err


def test_step_memo_file_of_another_schema_version_is_set_aside(tmp_path):
    with sqlite3.connect(tmp_path / STEP_MEMO_FILE) as db:
        db.execute("CREATE TABLE steps (k TEXT)")
        db.execute("PRAGMA user_version=99")
    card = Card()
    memo, store = memo_at(tmp_path)
    answer = run(memo, ("t", 1), card.generate)
    store.close()
    assert answer[1] is False and (tmp_path / f"{STEP_MEMO_FILE}.unreadable").exists()


def test_step_memo_file_that_cannot_be_opened_is_a_configuration_error_naming_it(tmp_path):
    path = tmp_path / "missing-dir" / STEP_MEMO_FILE
    with pytest.raises(ConfigurationError) as refused:
        PersistedSteps(path)
    assert str(path) in refused.value.message


def test_step_memo_file_left_readable_by_others_is_made_private_again(tmp_path):
    path = tmp_path / STEP_MEMO_FILE
    path.touch(mode=0o644)
    path.chmod(0o644)
    PersistedSteps(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_step_memo_file_row_that_does_not_decode_runs_the_step_again_with_a_warning(tmp_path, capsys):
    card = Card()
    memo, store = memo_at(tmp_path)
    run(memo, ("t", 1), card.generate)
    store.close()
    with sqlite3.connect(tmp_path / STEP_MEMO_FILE) as db:
        db.execute("UPDATE steps SET outcome = ?", (b"\xff\xff\xff not a StepOutcome",))
    db.close()
    memo, store = memo_at(tmp_path)
    again = run(memo, ("t", 1), card.generate)
    store.close()
    assert again == (cards.GeneratedKey(b"k1", b"public key #2", b""), False)
    assert "a remembered step is unreadable" in "".join(capsys.readouterr())
