"""A resent step (same task id and step number) is answered from its first result."""
import asyncio
import functools

import pytest

from gateway.core.idempotency import StepMemo
from shared.errors import PinIncorrect


def test_repeated_step_is_answered_from_first_result_not_run_twice():
    memo, runs = StepMemo(), []

    async def work():
        runs.append(1)
        await asyncio.sleep(0.01)
        return len(runs)

    async def main():
        first, second = await asyncio.gather(memo.run(("t", 1), work), memo.run(("t", 1), work))
        third = await memo.run(("t", 1), work)
        other = await memo.run(("t", 2), work)
        return first, second, third, other

    first, second, third, other = asyncio.run(main())
    assert first == (1, False) and second == (1, True) and third == (1, True)
    assert other == (2, False)
    assert len(runs) == 2


def test_repeated_failed_step_reports_the_same_error_without_running_again():
    memo, runs = StepMemo(), []

    async def work():
        runs.append(1)
        raise PinIncorrect("wrong PIN", attempts_remaining="2")

    async def main():
        for _ in range(2):
            with pytest.raises(PinIncorrect):
                await memo.run(("t", 1), work)

    asyncio.run(main())
    assert len(runs) == 1


def test_steps_without_task_id_are_never_remembered():
    memo, runs = StepMemo(), []

    async def work():
        runs.append(1)
        return "ok"

    async def main():
        await memo.run(None, work)
        await memo.run(None, work)

    asyncio.run(main())
    assert len(runs) == 2


def test_memo_forgets_oldest_steps_beyond_capacity():
    memo = StepMemo(capacity=2)

    async def main():
        for n in range(3):
            await memo.run(("t", n), functools.partial(asyncio.sleep, 0, n))
        return await memo.run(("t", 0), lambda: asyncio.sleep(0, "again"))

    assert asyncio.run(main()) == ("again", False)


def test_step_whose_caller_is_cancelled_mid_run_finishes_and_answers_the_resend_without_running_again():
    """Takeover (docs/rules.md, C16): the link that carried a step drops while the card works
    (its caller is cancelled); the step still ends, and the step resent through the next link
    gets that outcome instead of waiting for an abandoned run."""
    memo, runs = StepMemo(), []

    async def main():
        started, card_done = asyncio.Event(), asyncio.Event()

        async def work():
            runs.append(1)
            started.set()
            await card_done.wait()          # the card operation, which a cancelled caller cannot stop
            return "written"

        caller = asyncio.create_task(memo.run(("t", 3), work))
        await started.wait()
        caller.cancel()                     # the link drops
        with pytest.raises(asyncio.CancelledError):
            await caller
        resend = asyncio.create_task(memo.run(("t", 3), work))
        await asyncio.sleep(0)
        assert not resend.done()            # waits for the run still going on
        card_done.set()
        return await asyncio.wait_for(resend, 5)

    assert asyncio.run(main()) == ("written", True)
    assert len(runs) == 1
