"""Remembers the first result of each step key so a resent step is answered, not run twice —
also while the first run is still in progress. The executor (gateway/core/executor.py) makes
the key: caller, reader, operation, task id and step number."""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from shared.errors import PinAttemptsThrottled

StepKey = tuple[Hashable, ...]


class StepMemo:
    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._results: OrderedDict[StepKey, asyncio.Future] = OrderedDict()

    async def run(self, key: StepKey | None, work: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Returns (value, replayed). Errors are remembered like values and raised again."""
        if key is None:
            return await work(), False
        first = self._results.get(key)
        if first is not None:
            self._results.move_to_end(key)
            return await asyncio.shield(first), True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._results[key] = future
        while len(self._results) > self._capacity:
            self._results.popitem(last=False)
        try:
            value = await work()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # marks it retrieved: a replay re-raises it, nobody else must
            if isinstance(exc, PinAttemptsThrottled):
                self._results.pop(key, None)   # nothing ran: the same step may try again later
            raise
        future.set_result(value)
        return value, False
