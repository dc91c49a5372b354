"""Runs steps on readers: dispatches each operation to the reader's driver on its thread,
and answers a resent step from its first result.

A step is remembered under its caller, reader, operation, task id and step number (StepMemo):
a caller is answered only from its own steps. Another caller of the gateway's service that
sends the same (task id, step number) first neither seeds the orchestrator's answer nor
reads it; a resent step that names another reader or operation runs as the new step it is.
The caller is the verified certificate of a GatewayService call (None on an --insecure
gateway: every such caller is one) or `LinkCaller`, the orchestrator the link dialled. Every
link caller is one caller: the link is mutual TLS to an orchestrator-role certificate of the
deployment's CA, and the replicas of a deployment share their work, so a step resent by the
replica that took a task over (or by the same one through another address) is answered from
the memo (docs/rules.md, "Takeover").

What each step operation does on a PKCS#11 token is one row of TOKEN_OPERATIONS, keyed by the
operation's dataclass (the rows of shared.convert.STEP_OPERATIONS); a PC/SC reader runs only
PCSC_OPERATIONS; READER_OPERATIONS are answered from the inventory.
tests/unit/test_convert.py checks that every step operation has a row here.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.idempotency import StepMemo
from gateway.core.pin_guard import PinGuard
from gateway.core.registry import ReaderRegistry
from gateway.drivers.base import TokenDriver
from shared import cards
from shared.errors import CardlineError, UnsupportedOperation, quoted
from shared.logging import get_logger
from shared.tls import PeerIdentity, actor_of

log = get_logger(__name__)

# (driver, slot id, step, operation) -> value; runs on the driver's thread.
TokenOperation = Callable[[TokenDriver, int, cards.Step, Any], cards.StepValue]


def _generate_key_pair(d: TokenDriver, slot: int, step: cards.Step, op: cards.GenerateKeyPair) -> cards.StepValue:
    return d.generate_key_pair(slot, step.user_pin, op.key_type, op.label, op.key_id, op.csr_subject)


def _sign(d: TokenDriver, slot: int, step: cards.Step, op: cards.Sign) -> cards.StepValue:
    return cards.Signature(d.sign(slot, step.user_pin, op.key_id, op.algorithm, op.data))


def _write_certificates(d: TokenDriver, slot: int, step: cards.Step, op: cards.WriteCertificates) -> cards.StepValue:
    for c in op.certificates:
        d.write_certificate(slot, step.user_pin, c.key_id, c.label, c.certificate_der)
    return cards.WrittenCertificates(tuple(c.key_id for c in op.certificates))


def _list_objects(d: TokenDriver, slot: int, step: cards.Step, op: cards.ListObjects) -> cards.StepValue:
    return cards.ObjectListing(tuple(d.list_objects(slot, step.user_pin)))


def _delete_objects(d: TokenDriver, slot: int, step: cards.Step, op: cards.DeleteObjects) -> cards.StepValue:
    return cards.DeletedCount(d.delete_objects(slot, step.user_pin, op.key_id))


def _import_key_pair(d: TokenDriver, slot: int, step: cards.Step, op: cards.ImportKeyPair) -> cards.StepValue:
    d.import_key_pair(slot, step.user_pin, op.key_id, op.label, op.private_key_der, op.certificate_der)
    return cards.KeyPairImported(op.key_id)


def _set_pins(d: TokenDriver, slot: int, step: cards.Step, op: cards.SetPins) -> cards.StepValue:
    d.set_pins(slot, step.user_pin, step.so_pin, op.new_user_pin, op.new_so_pin)
    return cards.PinsSet()


def _write_data_object(d: TokenDriver, slot: int, step: cards.Step, op: cards.WriteDataObject) -> cards.StepValue:
    d.write_data_object(slot, step.user_pin, op.application, op.label, op.value, op.private)
    return cards.DataObjectWritten(op.label)


TOKEN_OPERATIONS: dict[type, TokenOperation] = {
    cards.GenerateKeyPair: _generate_key_pair,
    cards.Sign: _sign,
    cards.WriteCertificates: _write_certificates,
    cards.ListObjects: _list_objects,
    cards.DeleteObjects: _delete_objects,
    cards.ImportKeyPair: _import_key_pair,
    cards.SetPins: _set_pins,
    cards.WriteDataObject: _write_data_object,
}
PCSC_OPERATIONS: frozenset[type] = frozenset({cards.RunApduScript})
# Answered from the reader inventory, for both kinds of reader.
READER_OPERATIONS: frozenset[type] = frozenset({cards.ReadCardInfo})


@dataclass(frozen=True)
class LinkCaller:
    """The orchestrator, sending steps down the link this gateway dialled to TARGET (the
    link is mutual TLS: the gateway checked the orchestrator's certificate against its CA)."""
    target: str

    @property
    def actor(self) -> str:
        return f"link:{self.target}"


#: Who sent a step: never equal across the kinds, so no direct caller can stand for the link.
StepCaller = PeerIdentity | LinkCaller | None


def caller_key(caller: StepCaller) -> tuple[str | int | None, ...]:
    """CALLER in a step's memo key: plain values the memo file can keep (gateway/core/
    idempotency.py), the kind first so no direct caller can stand for the link."""
    if isinstance(caller, LinkCaller):
        # Any orchestrator replica of the deployment, not the address dialled: a replica that
        # takes a dead one's task over resends its steps through its own link.
        return ("link", "orchestrator")
    if isinstance(caller, PeerIdentity):
        return ("peer", caller.role, caller.name, caller.serial)
    return ("local",)


def caller_shown(caller: StepCaller) -> str:
    """How logs name CALLER."""
    return caller.actor if isinstance(caller, LinkCaller) else actor_of(caller)


class StepObserver(Protocol):
    """What the executor tells the metrics (gateway/metrics.py); reason: the error's, or None."""
    def step_done(self, operation: str, seconds: float, replayed: bool, reason: str | None) -> None: ...


class _Unobserved:
    def step_done(self, operation: str, seconds: float, replayed: bool, reason: str | None) -> None:
        pass


class StepExecutor:
    def __init__(self, registry: ReaderRegistry, memo: StepMemo | None = None,
                 observer: StepObserver | None = None, pin_guard: PinGuard | None = None) -> None:
        self.registry = registry
        self.memo = memo or StepMemo()
        self.pin_guard = pin_guard or PinGuard()
        self.observer: StepObserver = observer or _Unobserved()

    async def run(self, reader_id: str, step: cards.Step, task_id: str = "", step_number: int = 0, *,
                  caller: StepCaller) -> tuple[cards.StepValue, bool]:
        """Returns (value, replayed); raises the CardlineError the step ended with. A step
        without task id is never remembered."""
        op_name = type(step.operation).__name__
        key = (caller_key(caller), reader_id, op_name, task_id, step_number) if task_id else None
        started = time.perf_counter()
        try:
            value, replayed = await self.memo.run(key, lambda: self._dispatch(reader_id, step))
        except CardlineError as exc:
            self.observer.step_done(op_name, time.perf_counter() - started, False, exc.reason)
            log.info("step failed", reader_id=reader_id, task_id=task_id, step=step_number, op=op_name,
                     reason=exc.reason, caller=caller_shown(caller))
            raise
        except Exception as exc:            # a driver bug: counted, then reported by the caller
            self.observer.step_done(op_name, time.perf_counter() - started, False, type(exc).__name__)
            raise
        seconds = time.perf_counter() - started
        self.observer.step_done(op_name, seconds, replayed, None)
        log.info("step done", reader_id=reader_id, task_id=task_id, step=step_number, op=op_name, replayed=replayed,
                 ms=round(seconds * 1000, 1), caller=caller_shown(caller))
        return value, replayed

    async def _dispatch(self, reader_id: str, step: cards.Step) -> cards.StepValue:
        reader = self.registry.reader(reader_id)
        # Wrong PINs slow down the next attempt on that card (gateway/core/pin_guard.py).
        return await self.pin_guard.run(reader, step, lambda: self._on_reader(reader, step))

    async def _on_reader(self, reader: cards.Reader, step: cards.Step) -> cards.StepValue:
        reader_id = reader.reader_id
        if reader.kind is cards.ReaderKind.PCSC:
            return await self._pcsc(reader_id, step.operation)
        return await self._token(reader_id, step)

    async def _pcsc(self, reader_id: str, op: cards.Operation) -> cards.StepValue:
        info = self.registry.pcsc_reader_info(reader_id)
        pcsc = self.registry.pcsc
        assert pcsc is not None  # pcsc_reader_info found the reader: the PC/SC driver runs
        if type(op) in PCSC_OPERATIONS:                # the table the completeness test reads
            assert isinstance(op, cards.RunApduScript)
            responses = await self.registry.on_pcsc_worker(reader_id, pcsc.run_script, info.name, list(op.apdus))
            return cards.ApduScriptResult(tuple(responses))
        if type(op) in READER_OPERATIONS:
            return self.registry.reader(reader_id)
        raise UnsupportedOperation(f"{type(op).__name__} needs a PKCS#11 token; {quoted(reader_id)} is a PC/SC reader",
                                   reader_id=reader_id)

    async def _token(self, reader_id: str, step: cards.Step) -> cards.StepValue:
        slot = self.registry.token_slot(reader_id)
        op = step.operation
        if type(op) in READER_OPERATIONS:
            return self.registry.reader(reader_id)
        run = TOKEN_OPERATIONS.get(type(op))
        if run is None:
            raise UnsupportedOperation(f"{type(op).__name__} needs a PC/SC reader; {quoted(reader_id)} is a "
                                       "PKCS#11 slot", reader_id=reader_id)
        driver, slot_id = slot.driver, slot.info.slot_id
        return await driver.thread.call_async(lambda: run(driver, slot_id, step, op))
