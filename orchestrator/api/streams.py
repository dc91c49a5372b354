"""Streaming RPCs that follow work running on its own."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from shared.limits import Backlog


async def follow(start: Callable[[Callable[[Any], None]], Coroutine[Any, Any, object]],
                 is_last: Callable[[Any], bool]) -> AsyncIterator[Any]:
    """Runs `start(sink)` as its own task and yields what it reports until the last event.

    The work runs on even if the caller goes away or reads too slowly (dropped with
    WatcherTooSlow once it is shared.limits.MAX_WATCH_BACKLOG events behind): a task always
    ends in a defined state, never half-done because of a client."""
    events: Backlog[Any] = Backlog()
    job = asyncio.create_task(start(events.put))
    while True:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            if is_last(getter.result()):
                return
        else:
            getter.cancel()
            job.result()   # raises the error that ended it before it reported its end
            while not events.empty():
                yield await events.get()
            return
