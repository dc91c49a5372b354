"""One heartbeat watch serves every open gateway link (orchestrator/api/link.py): it sends a
heartbeat down each link that sent nothing for an interval, and ends a link whose gateway
sent nothing for three intervals — no timer per link and message."""
from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.api.link import _HEARTBEAT, GatewayLinkServicer, _Link
from orchestrator.services.pool import GatewaySession, ReaderPool

INTERVAL_S = 0.05


async def _idle_reader() -> None:
    await asyncio.Event().wait()          # reads nothing until cancelled


def _open_link(servicer: GatewayLinkServicer, gateway_id: str, *, heard_ago_s: float) -> _Link:
    link = _Link(GatewaySession(gateway_id=gateway_id))
    link.reader = asyncio.create_task(_idle_reader())
    link.last_heard = time.monotonic() - heard_ago_s
    servicer._open[id(link.session)] = link
    return link


def _reader(link: _Link) -> asyncio.Task:
    assert link.reader is not None
    return link.reader


def test_one_watch_beats_on_every_idle_link_and_ends_only_the_silent_one():
    async def scenario() -> None:
        servicer = GatewayLinkServicer(ReaderPool(), "orchestrator-test", INTERVAL_S)
        # Heard from "a minute from now": these gateways keep talking however slow the machine.
        talking = [_open_link(servicer, f"station-{i}", heard_ago_s=-60) for i in range(3)]
        silent = _open_link(servicer, "station-silent", heard_ago_s=10 * INTERVAL_S)
        watch = asyncio.create_task(servicer._watch_heartbeats())
        try:
            for link in talking:           # a heartbeat comes down each idle link
                assert await asyncio.wait_for(link.session.outbox.get(), 5) is _HEARTBEAT
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(_reader(silent), 5)     # its reading ended: the gateway fell silent
            assert silent.silent
            assert not any(link.silent for link in talking)
            assert all(link.beat_queued for link in talking)   # one heartbeat waits per link, no more
            assert all(link.session.outbox.qsize() == 0 for link in talking)
        finally:
            watch.cancel()
            for link in (*talking, silent):
                _reader(link).cancel()

    asyncio.run(scenario())


def test_the_watch_ends_when_the_last_link_closes():
    async def scenario() -> None:
        servicer = GatewayLinkServicer(ReaderPool(), "orchestrator-test", INTERVAL_S)
        link = _open_link(servicer, "station-1", heard_ago_s=-60)
        watch = asyncio.create_task(servicer._watch_heartbeats())
        await asyncio.wait_for(link.session.outbox.get(), 5)
        servicer._open.clear()
        await asyncio.wait_for(watch, 5)
        _reader(link).cancel()

    asyncio.run(scenario())
