"""TEST-ONLY fault injection for the crash-consistency tests of rule C16. Never set these
variables in production: they make the orchestrator kill itself or lose CA answers.

orchestrator/app.py imports this module only when an environment variable starting with
CARDLINE_FAULT_ is set, and logs a warning naming every fault it installed:

    CARDLINE_FAULT_KILL_AT=<boundary>[:<n>]
        SIGKILL the orchestrator's own process at the n-th occurrence (default 1), counted
        over the whole process, of that card task boundary (card_tasks.BOUNDARIES).
    CARDLINE_FAULT_KILL_DELAY_MS=<ms>
        with KILL_AT: wait this long at the boundary (the task stays blocked there) before
        the kill - e.g. `write_sent` with a delay lets the gateway finish the write first.
    CARDLINE_FAULT_CA_LOST_ANSWER=<n>
        the n-th CA issue call (over every CA) really issues, then raises CaUnavailable: the
        answer is lost on the way back, as when the connection breaks after issuance.
    CARDLINE_FAULT_CA_DOWN=1
        every CA call raises CaUnavailable before reaching the CA.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Mapping

from orchestrator.ca.base import CaConnector, IssueProfile
from orchestrator.services.card_tasks import BOUNDARIES, BoundaryHook
from shared.errors import CaUnavailable, ConfigurationError
from shared.logging import get_logger

log = get_logger(__name__)

PREFIX = "CARDLINE_FAULT_"
KILL_AT = PREFIX + "KILL_AT"
KILL_DELAY_MS = PREFIX + "KILL_DELAY_MS"
CA_LOST_ANSWER = PREFIX + "CA_LOST_ANSWER"
CA_DOWN = PREFIX + "CA_DOWN"
KNOWN = (KILL_AT, KILL_DELAY_MS, CA_LOST_ANSWER, CA_DOWN)


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    return any(k.startswith(PREFIX) and v for k, v in environ.items())


def _positive(name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigurationError(f"{name}={text!r}: expected a positive whole number")
    return int(text)


def kill_hook(boundary: str, n: int = 1, delay_s: float = 0.0) -> BoundaryHook:
    """A boundary hook that SIGKILLs this process at the n-th `boundary`."""
    if boundary not in BOUNDARIES:
        raise ConfigurationError(f"{KILL_AT}: unknown boundary {boundary!r}; known: {', '.join(BOUNDARIES)}")
    seen = itertools.count(1)

    async def hook(name: str, task_id: str) -> None:
        if name != boundary or next(seen) != n:
            return
        if delay_s:
            await asyncio.sleep(delay_s)
        log.warning("fault injection: SIGKILL", boundary=boundary, occurrence=n, task_id=task_id)
        os.kill(os.getpid(), signal.SIGKILL)

    return hook


def chain(*hooks: BoundaryHook | None) -> BoundaryHook | None:
    present = [h for h in hooks if h is not None]
    if len(present) <= 1:
        return present[0] if present else None

    async def hook(name: str, task_id: str) -> None:
        for h in present:
            await h(name, task_id)

    return hook


class _Delegating:
    """Everything not overridden goes to the wrapped connector."""

    def __init__(self, inner: CaConnector) -> None:
        self._inner = inner

    @property
    def name(self) -> str:
        return self._inner.name

    def __getattr__(self, attribute: str):
        return getattr(self._inner, attribute)


class AnswerLosingCa(_Delegating):
    """Test-only: the n-th issue call (counted over every wrapper sharing `counter`) reaches
    the CA, which issues and records the certificate, and then raises CaUnavailable as if
    the connection had broken on the way back."""

    def __init__(self, inner: CaConnector, lose_nth: int, counter: itertools.count | None = None) -> None:
        super().__init__(inner)
        self._lose_nth = lose_nth
        self._counter = counter or itertools.count(1)     # next() on a count is atomic

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        nth = next(self._counter)
        der = self._inner.issue(csr_der, profile, request_id)
        if nth == self._lose_nth:
            log.warning("fault injection: CA answer lost after issuance", ca=self.name, request_id=request_id)
            raise CaUnavailable(f"connection to CA {self.name!r} lost while waiting for its answer "
                                "(fault injection)", request_id=request_id)
        return der


class UnreachableCa(_Delegating):
    """Test-only: every call to the CA fails with CaUnavailable before reaching it; only its
    name is known."""

    def __getattr__(self, attribute: str):
        target = getattr(self._inner, attribute)
        if not callable(target):
            return target

        def unreachable(*_args, **_kwargs):
            raise CaUnavailable(f"CA {self.name!r} cannot be reached (fault injection)")

        return unreachable

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        raise CaUnavailable(f"CA {self.name!r} cannot be reached (fault injection)", request_id=request_id)

    def find_issued(self, request_id: str) -> bytes | None:
        raise CaUnavailable(f"CA {self.name!r} cannot be reached (fault injection)", request_id=request_id)

    def ca_certificate_der(self) -> bytes:
        raise CaUnavailable(f"CA {self.name!r} cannot be reached (fault injection)")


def install(environ: Mapping[str, str], cas: dict[str, CaConnector],
            boundary: BoundaryHook | None) -> tuple[dict[str, CaConnector], BoundaryHook | None]:
    """The CAs and boundary hook with the faults the environment asks for."""
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in KNOWN)
    if unknown:
        raise ConfigurationError(f"unknown fault injection variable(s) {unknown}; known: {', '.join(KNOWN)}")
    installed = []
    if spec := environ.get(KILL_AT, ""):
        name, _, nth = spec.partition(":")
        n = _positive(KILL_AT, nth) if nth else 1
        delay_ms = environ.get(KILL_DELAY_MS, "")
        delay_s = _positive(KILL_DELAY_MS, delay_ms) / 1000 if delay_ms else 0.0
        boundary = chain(boundary, kill_hook(name, n, delay_s))
        installed.append(f"SIGKILL at {name} #{n}" + (f" after {delay_ms} ms" if delay_s else ""))
    if environ.get(CA_DOWN, "") not in ("", "0"):
        cas = {name: UnreachableCa(ca) for name, ca in cas.items()}
        installed.append("every CA unreachable")
    elif lost := environ.get(CA_LOST_ANSWER, ""):
        nth = _positive(CA_LOST_ANSWER, lost)
        counter = itertools.count(1)
        cas = {name: AnswerLosingCa(ca, nth, counter) for name, ca in cas.items()}
        installed.append(f"CA answer #{nth} lost after issuance")
    for fault in installed:
        log.warning("TEST-ONLY FAULT INJECTION ACTIVE", fault=fault)
    return cas, boundary
