"""Runs steps on readers: dispatches each operation to the reader's driver on its worker,
and answers a resent (task id, step number) from its first result."""
from __future__ import annotations

import time

from gateway.core.idempotency import StepMemo
from gateway.core.registry import ReaderRegistry
from shared import cards
from shared.errors import CardlineError, UnsupportedOperation
from shared.logging import get_logger

log = get_logger(__name__)


class StepExecutor:
    def __init__(self, registry: ReaderRegistry, memo: StepMemo | None = None) -> None:
        self.registry = registry
        self.memo = memo or StepMemo()

    async def run(self, reader_id: str, step: cards.Step, task_id: str = "",
                  step_number: int = 0) -> tuple[cards.StepValue, bool]:
        """Returns (value, replayed); raises the CardlineError the step ended with."""
        key = (task_id, step_number) if task_id else None
        op_name = type(step.operation).__name__
        started = time.perf_counter()
        try:
            value, replayed = await self.memo.run(key, lambda: self._dispatch(reader_id, step))
        except CardlineError as exc:
            log.info("step failed", reader_id=reader_id, task_id=task_id, step=step_number, op=op_name,
                     reason=exc.reason)
            raise
        log.info("step done", reader_id=reader_id, task_id=task_id, step=step_number, op=op_name, replayed=replayed,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        return value, replayed

    async def _dispatch(self, reader_id: str, step: cards.Step) -> cards.StepValue:
        reader = self.registry.reader(reader_id)
        if reader.kind is cards.ReaderKind.PCSC:
            return await self._pcsc(reader_id, step.operation)
        return await self._token(reader_id, step)

    async def _pcsc(self, reader_id: str, op: cards.Operation) -> cards.StepValue:
        info = self.registry.pcsc_reader_info(reader_id)
        pcsc = self.registry.pcsc
        match op:
            case cards.RunApduScript(apdus=apdus):
                responses = await self.registry.on_pcsc_worker(reader_id, pcsc.run_script, info.name, list(apdus))
                return cards.ApduScriptResult(tuple(responses))
            case cards.ReadCardInfo():
                return self.registry.reader(reader_id)
        raise UnsupportedOperation(f"{type(op).__name__} needs a PKCS#11 token; {reader_id!r} is a PC/SC reader",
                                   reader_id=reader_id)

    async def _token(self, reader_id: str, step: cards.Step) -> cards.StepValue:
        slot = self.registry.token_slot(reader_id)
        call, slot_id, pin = slot.worker.call, slot.info.slot_id, step.user_pin
        match step.operation:
            case cards.GenerateKeyPair() as op:
                return await call("generate_key_pair", slot_id, pin, op.key_type, op.label, op.key_id, op.csr_subject)
            case cards.Sign() as op:
                return cards.Signature(await call("sign", slot_id, pin, op.key_id, op.algorithm, op.data))
            case cards.WriteCertificates() as op:
                for c in op.certificates:
                    await call("write_certificate", slot_id, pin, c.key_id, c.label, c.certificate_der)
                return cards.WrittenCertificates(tuple(c.key_id for c in op.certificates))
            case cards.ListObjects():
                return cards.ObjectListing(tuple(await call("list_objects", slot_id, pin)))
            case cards.DeleteObjects() as op:
                return cards.DeletedCount(await call("delete_objects", slot_id, pin, op.key_id))
            case cards.ReadCardInfo():
                return self.registry.reader(reader_id)
            case cards.ImportKeyPair() as op:
                await call("import_key_pair", slot_id, pin, op.key_id, op.label, op.private_key_der, op.certificate_der)
                return cards.KeyPairImported(op.key_id)
            case cards.SetPins() as op:
                await call("set_pins", slot_id, pin, step.so_pin, op.new_user_pin, op.new_so_pin)
                return cards.PinsSet()
            case cards.WriteDataObject() as op:
                await call("write_data_object", slot_id, pin, op.application, op.label, op.value, op.private)
                return cards.DataObjectWritten(op.label)
        raise UnsupportedOperation(f"{type(step.operation).__name__} needs a PC/SC reader; {reader_id!r} is a "
                                   "PKCS#11 slot", reader_id=reader_id)
