"""The gateway link's dialling order over several orchestrator addresses (gateway/api/
link_client.py): the next address after a short pause, exponential backoff only after a
whole round of failed addresses, a fresh round after a link that held. The sessions here are
stand-ins that fail at once (what a dead orchestrator does to a dial); the pauses are read
from the ceiling the link draws its jitter under. tests/integration/test_failover.py shows
the same with real processes."""
from __future__ import annotations

import asyncio
import random
from typing import Any, cast

import pytest

from gateway.api.link_client import OrchestratorLink
from shared.errors import ConfigurationError

MIN_S = 0.001


class ScriptedLink(OrchestratorLink):
    """A link whose sessions fail at once; those whose number is in `attach_on` were first
    welcomed (attached). Stops after `dials` sessions."""

    def __init__(self, targets: list[str], dials: int, attach_on: frozenset[int] = frozenset()) -> None:
        super().__init__(targets, "gw-1", cast(Any, None), cast(Any, None), backoff_min_s=MIN_S, backoff_max_s=1.0)
        self.dialled: list[str] = []
        self.dials, self.attach_on = dials, attach_on

    async def _session(self) -> None:
        self.dialled.append(self.target)
        if len(self.dialled) >= self.dials:
            raise asyncio.CancelledError
        if len(self.dialled) in self.attach_on:
            self.attached = self.target
        raise ConnectionError("nobody there")


def run(link: ScriptedLink, monkeypatch) -> list[float]:
    """Runs LINK until it stops; the ceilings of the pauses it drew, in multiples of MIN_S."""
    ceilings: list[float] = []

    def no_jitter(low: float, high: float) -> float:
        ceilings.append(round(high / MIN_S))
        return 0.0

    monkeypatch.setattr(random, "uniform", no_jitter)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(link.run_forever())
    return ceilings


def test_link_dials_the_next_address_and_backs_off_only_after_a_full_failed_round(monkeypatch):
    link = ScriptedLink(["a:1", "b:1", "c:1"], dials=7)
    ceilings = run(link, monkeypatch)
    assert link.dialled == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1", "a:1"]
    assert ceilings == [1, 1, 2, 1, 1, 4]


def test_link_that_held_starts_a_fresh_round_at_the_next_address(monkeypatch):
    link = ScriptedLink(["a:1", "b:1"], dials=6, attach_on=frozenset({4}))
    ceilings = run(link, monkeypatch)
    assert link.dialled == ["a:1", "b:1", "a:1", "b:1", "a:1", "b:1"]
    assert ceilings == [1, 2, 1, 1, 1]      # the first round failed (2); b held (dial 4): a short pause again


def test_link_with_one_address_backs_off_as_before(monkeypatch):
    ceilings = run(ScriptedLink(["a:1"], dials=4), monkeypatch)
    assert ceilings == [2, 4, 8]


def test_link_without_an_address_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="no orchestrator address"):
        OrchestratorLink([], "gw-1", cast(Any, None), cast(Any, None))
