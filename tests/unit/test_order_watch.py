"""WatchOrder (docs/pool.md, "Orders"): the watch of an order run here ends with the snapshot
of the ended order, also when the order ends while the previous snapshot is being sent."""
from __future__ import annotations

import asyncio

from orchestrator.services.orders import SUCCEEDED, Order, OrderCard, OrderService
from orchestrator.services.pool import ReaderPool, ReaderSelector


def test_watch_ends_with_the_ended_order_when_it_ends_while_a_snapshot_is_sent(sqlite_store):
    async def main() -> list[list[str]]:
        service = OrderService(processes=None, pool=ReaderPool(), store=sqlite_store,  # type: ignore[arg-type]
                               owner_id="replica-a")
        order = Order("o1", "produce", ReaderSelector(site="hq"), [OrderCard(0), OrderCard(1)])
        service._orders[order.id] = order            # as create() registers an order run here
        seen: list[list[str]] = []
        async for snapshot in service.watch(order.id):
            seen.append([c.state for c in snapshot.cards])
            if len(seen) == 1:                       # the cards end while the caller holds this snapshot
                for card in order.cards:
                    card.state = SUCCEEDED
                order.touch()
        return seen

    seen = asyncio.run(asyncio.wait_for(main(), 10))
    assert seen == [["queued", "queued"], ["succeeded", "succeeded"]]
