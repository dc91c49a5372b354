"""TEST-ONLY faults for the crash-consistency tests of rule C16, installed through the
orchestrator's own hooks (`orchestrator.app.start(boundary=..., wrap_cas=...)`) by the test
entry script tests/support/faulty_orchestrator.py; nothing in the runtime packages knows them.

    kill_hook(boundary, n, delay_s)   SIGKILL the process group at the n-th occurrence of a card
                                      task boundary (card_tasks.BOUNDARIES), after delay_s.
    AnswerLosingCa(ca, n)             the n-th issue call issues, then raises CaUnavailable: the
                                      answer is lost on the way back.
    UnreachableCa(ca)                 every CA call raises CaUnavailable before reaching the CA.
    GroupKillingCa(ca, when)          SIGKILL the process group inside the first issue call, just
                                      before or just after the CA issued.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import signal

from orchestrator.ca.base import CaConnector, IssueProfile
from orchestrator.services.card_tasks import BOUNDARIES, BoundaryHook
from shared.errors import CaUnavailable, ConfigurationError
from shared.logging import get_logger

log = get_logger(__name__)

def kill_group(sig: signal.Signals = signal.SIGKILL) -> None:
    """SIGKILL this process's whole process group - as a container stop, a cgroup OOM kill or
    systemd's KillMode=control-group do: any `openssl` child dies with the orchestrator.
    SIGSTOP freezes it instead (a replica that stalls; SIGCONT from the test resumes it)."""
    os.killpg(os.getpgid(0), sig)


def kill_hook(boundary: str, n: int = 1, delay_s: float = 0.0,
              sig: signal.Signals = signal.SIGKILL) -> BoundaryHook:
    """A boundary hook that SIGKILLs (or sends SIG to) this process group at the n-th `boundary`."""
    if boundary not in BOUNDARIES:
        raise ConfigurationError(f"unknown boundary {boundary!r}; known: {', '.join(BOUNDARIES)}")
    seen = itertools.count(1)

    async def hook(name: str, task_id: str) -> None:
        if name != boundary or next(seen) != n:
            return
        if delay_s:
            await asyncio.sleep(delay_s)
        log.warning(f"fault injection: {sig.name} of the process group", boundary=boundary, occurrence=n,
                    task_id=task_id)
        kill_group(sig)

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


class GroupKillingCa(_Delegating):
    """Test-only: the first issue call (counted over every wrapper sharing `counter`) kills
    the process group just before the CA issues ("before") or just after, before the answer
    is returned ("after")."""

    def __init__(self, inner: CaConnector, when: str, counter: itertools.count | None = None) -> None:
        if when not in ("before", "after"):
            raise ConfigurationError(f"kill inside the CA call 'before' or 'after', not {when!r}")
        super().__init__(inner)
        self._when = when
        self._counter = counter or itertools.count(1)

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        first = next(self._counter) == 1
        if first and self._when == "before":
            log.warning("fault injection: SIGKILL of the process group inside the CA call, before issuing")
            kill_group()
        der = self._inner.issue(csr_der, profile, request_id)
        if first:
            log.warning("fault injection: SIGKILL of the process group inside the CA call, after issuing")
            kill_group()
        return der
