"""Process instances: a process definition's tasks run in order on a stored process map,
the on_error path when one fails. PINs and PUKs (secret inputs) pass through to the card
tasks and are never stored."""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import cast

from orchestrator.domain.processes import (
    CardOperationTask,
    CardProductionTask,
    ChangeStateInCaTask,
    ChangeStateTask,
    CoreObjectDescriptor,
    ExpressionError,
    HandleIssuedTask,
    LoadCertificatesTask,
    ProcessDefinition,
    ProcessMap,
    ReaderSpec,
    TaskDefinition,
    render,
    variable_of,
)
from orchestrator.domain.templates import CardTemplate
from orchestrator.services.auditing import acting
from orchestrator.services.card_life import CardLifeService
from orchestrator.services.card_tasks import OPERATION, PRODUCTION, CardTaskOrder, CardTaskService, Progress
from orchestrator.services.certificates import CertificateService
from orchestrator.services.configuration import Configuration
from orchestrator.services.pool import ReaderSelector
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.records import (
    AUDIT_PROCESS_FINISHED,
    AUDIT_PROCESS_STARTED,
    AUDIT_PROCESS_TASK,
    CARD,
    CERTIFICATE,
    PROCESS_INSTANCE,
    ProcessInstanceRecord,
    ProcessState,
)
from orchestrator.store.store import Store
from shared.errors import CardlineError, EncodingFailed, InvalidArgument, NotFound, quoted
from shared.limits import check_days
from shared.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ProcessProgress:
    instance_id: str
    task_index: int
    task_type: str
    message: str
    on_error: bool = False
    instance: ProcessInstanceRecord | None = None


ProcessProgressSink = Callable[[ProcessProgress], None]


def selector_of(spec: ReaderSpec) -> ReaderSelector:
    return ReaderSelector(gateway_id=spec.gateway or "", reader_id=spec.reader or "", kind=spec.kind,
                          site=spec.site or "", labels=dict(spec.labels))


def _as_cardline_error(exc: Exception) -> CardlineError:
    if isinstance(exc, CardlineError):
        return exc
    log.exception("process task crashed", error=type(exc).__name__)
    return CardlineError(f"{type(exc).__name__}: {exc}")


class ProcessService:
    def __init__(self, store: Store, configuration: Configuration, card_tasks: CardTaskService,
                 certificates: CertificateService) -> None:
        self.store = store
        self.configuration = configuration
        self.card_tasks = card_tasks
        self.certificates = certificates
        self.cards = CardLifeService(store, configuration.graphs, configuration.templates, certificates)
        # C16: the process instances running here right now (the reconciler ends RUNNING
        # instances no live run owns); they are stored with the card task service's owner.
        self.running: set[str] = set()

    def definition(self, name: str) -> ProcessDefinition:
        try:
            return self.configuration.processes[name]
        except KeyError:
            known = ", ".join(sorted(self.configuration.processes)) or "none"
            raise NotFound(f"no process {quoted(name)} (known: {known})", process=name) from None

    async def start(self, name: str, inputs: Mapping[str, object],
                    progress: ProcessProgressSink = lambda p: None, *,
                    request_id: str = "") -> ProcessInstanceRecord:
        """Runs a new instance of process `name` to its end. request_id (chosen by the
        client): a retry with the same id starts nothing and follows the instance the first
        call started to its end instead (the same id for other inputs: AlreadyExists)."""
        definition = self.definition(name)
        try:
            process_map, secrets = definition.split_inputs(inputs)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="inputs") from None
        instance_id = str(uuid.uuid4())
        self.running.add(instance_id)           # before the row exists: see CardTaskService.run
        try:
            if request_id:
                # Secrets stay out of the fingerprint: it is stored.
                instance, created = await asyncio.to_thread(
                    self.store.processes.create_once, name, process_map.to_dict(), request_id,
                    fingerprint(name, sorted(process_map.to_dict().items())),
                    owner=self.card_tasks.owner_id, instance_id=instance_id)
                if not created:
                    return await self._follow_first(instance, progress)
            else:
                instance = await asyncio.to_thread(self.store.processes.create, name, process_map.to_dict(),
                                                   owner=self.card_tasks.owner_id, instance_id=instance_id)
            run = _ProcessRun(self, definition, instance.id, process_map, secrets, progress)
            return await run.execute()
        finally:
            self.running.discard(instance_id)

    async def _follow_first(self, instance: ProcessInstanceRecord,
                            progress: ProcessProgressSink) -> ProcessInstanceRecord:
        """A retried start: waits for the instance the first call started (here or on
        another orchestrator) to end, and reports it as the last progress."""
        log.info("process start retried with its request id; following the first instance", instance=instance.id)
        delay = 0.05
        while instance.state == ProcessState.RUNNING:
            await asyncio.sleep(delay)          # polled: the first run may belong to another orchestrator
            delay = min(delay * 2, 1.0)
            instance = await asyncio.to_thread(self.store.processes.get, instance.id)
        progress(ProcessProgress(instance.id, 0, "", f"request already handled: process instance {instance.id} "
                                 f"{instance.state.lower()}", instance=instance))
        return instance


class _ProcessRun:
    def __init__(self, service: ProcessService, definition: ProcessDefinition, instance_id: str,
                 process_map: ProcessMap, secrets: dict[str, str], progress: ProcessProgressSink) -> None:
        self.s = service
        self.definition = definition
        self.instance_id = instance_id
        self.process_map = process_map
        self.secrets = secrets
        self.progress = progress
        # The caller who started the process acts in it (docs/audit.md); in-process runs name the process.
        self.actor = acting(f"process:{definition.name}:{instance_id}")
        self.on_error = False

    def _tell(self, index: int, task: TaskDefinition, message: str) -> None:
        self.progress(ProcessProgress(self.instance_id, index, task.type, message, self.on_error))

    async def _save_map(self) -> None:
        await asyncio.to_thread(self.s.store.processes.update_map, self.instance_id, self.process_map.to_dict())

    async def _audit(self, action: str, detail: Mapping[str, object]) -> None:
        await asyncio.to_thread(self.s.store.audit.record, action, PROCESS_INSTANCE, self.instance_id, self.actor,
                                {"process": self.definition.name, **detail})

    async def execute(self) -> ProcessInstanceRecord:
        error: CardlineError | None = None
        await self._audit(AUDIT_PROCESS_STARTED, {"inputs": sorted(self.process_map)})
        for index, task in enumerate(self.definition.tasks):
            try:
                await self._run_task(index, task)
                await self._audit(AUDIT_PROCESS_TASK, {"index": index, "type": task.type, "outcome": "succeeded"})
            except Exception as exc:  # the instance always ends in a defined state
                error = _as_cardline_error(exc)
                self._tell(index, task, f"{task.type} failed: {error.reason}: {error.message}")
                await self._audit(AUDIT_PROCESS_TASK, {"index": index, "type": task.type, "outcome": "failed",
                                                       "error_reason": error.reason})
                break
            finally:
                await self._save_map()
        if error is not None:
            self.on_error = True
            offset = len(self.definition.tasks)
            for index, task in enumerate(self.definition.on_error, start=offset):
                try:
                    await self._run_task(index, task)
                    await self._audit(AUDIT_PROCESS_TASK, {"index": index, "type": task.type, "on_error": True,
                                                           "outcome": "succeeded"})
                except Exception as exc:  # the error path goes on: every handler gets its chance
                    failure = _as_cardline_error(exc)
                    await self._audit(AUDIT_PROCESS_TASK, {"index": index, "type": task.type, "on_error": True,
                                                           "outcome": "failed", "error_reason": failure.reason})
                    log.warning("on_error task failed", instance=self.instance_id, task=task.type,
                                reason=failure.reason)
                    self._tell(index, task, f"{task.type} failed: {failure.reason}: {failure.message}")
                finally:
                    await self._save_map()
        instance = await asyncio.to_thread(
            self.s.store.processes.finish, self.instance_id, ProcessState.FAILED if error else ProcessState.SUCCEEDED,
            error.reason if error else None, error.message if error else None, self.process_map.to_dict())
        await self._audit(AUDIT_PROCESS_FINISHED, {"state": instance.state, "error_reason": instance.error_reason})
        self.progress(ProcessProgress(self.instance_id, len(self.definition.tasks), "", (
            f"process {self.definition.name} failed: {error.message}" if error
            else f"process {self.definition.name} succeeded"), self.on_error, instance))
        return instance

    # --- values ------------------------------------------------------------------------

    def _scope(self) -> Mapping[str, object]:
        # Read only, so the secrets' str values may stand among the process map's objects.
        return ChainMap(cast("dict[str, object]", self.secrets), self.process_map)

    def _text_variables(self) -> dict[str, str]:
        """The process map's text values (its inputs; never a secret): what certificate
        templates' subject patterns and subjectAltName rules may read."""
        return {k: str(v) for k, v in self.process_map.items()
                if isinstance(v, (str, int, float)) and not isinstance(v, bool)}

    def _read(self, variable: str) -> object:
        if variable not in self.process_map or self.process_map[variable] is None:
            raise InvalidArgument(f"process variable {variable!r} has no value", variable=variable)
        return self.process_map[variable]

    def _descriptors(self, variable: str, kind: str) -> list[CoreObjectDescriptor]:
        value = self._read(variable)
        values = value if isinstance(value, list) else [value]
        found = [v for v in values if isinstance(v, CoreObjectDescriptor) and v.type == kind]
        if len(found) != len(values):
            raise InvalidArgument(f"process variable {variable!r} must hold {kind} descriptors", variable=variable)
        return found

    def _render(self, template: str) -> str:
        try:
            return render(template, self._scope())
        except ExpressionError as exc:
            raise InvalidArgument(str(exc)) from None

    # --- tasks -------------------------------------------------------------------------

    async def _run_task(self, index: int, task: TaskDefinition) -> None:
        match task:
            case CardProductionTask() | CardOperationTask():
                await self._card_task(index, task)
            case ChangeStateTask():
                await self._change_state(index, task)
            case ChangeStateInCaTask():
                for d in self._descriptors(task.certificates, CERTIFICATE):
                    record = await asyncio.to_thread(self.s.certificates.change_state_in_ca, d.id, task.state,
                                                     task.reason, self.actor)
                    self._tell(index, task, f"certificate {record.serial_hex} is {record.state} (through its CA)")
            case HandleIssuedTask():
                await self._handle_issued(index, task)
            case LoadCertificatesTask():
                await self._load_certificates(index, task)
            case _:
                raise InvalidArgument(f"task type {task.type!r} cannot run")

    async def _card_task(self, index: int, task: CardProductionTask | CardOperationTask) -> None:
        config = self.s.configuration
        card_template = config.templates.card(task.card_template) if task.card_template else None
        encoding_name = task.encoding if isinstance(task, CardOperationTask) and task.encoding else \
            (card_template.encoding if card_template else "")
        encoding = config.encodings.get(encoding_name)
        if encoding is None:
            raise EncodingFailed(f"{self.definition.source}:{task.line}: no encoding description {encoding_name!r}")
        card_id = None
        if task.card and isinstance(task, CardOperationTask):
            value = self.process_map.get(task.card)
            if isinstance(value, CoreObjectDescriptor) and value.type == CARD:
                card_id = value.id                  # C8: the operation works on the card of the process map
                if card_template is None:
                    card = await asyncio.to_thread(self.s.store.cards.get, card_id)
                    card_template = config.templates.card(card.template)
        if card_template is None:            # an operation on a card the store does not know
            card_template = CardTemplate(name="")
        return_fields = set(encoding.return_fields())
        fields: dict[str, object] = {}
        for name, expr in task.fields.items():
            if name in return_fields:
                continue                            # written after the task, not read
            variable = variable_of(expr)
            fields[name] = self._scope().get(variable) if variable else self._render(expr)
        subject = self._render(task.subject) if task.subject else f"CN={self.definition.name} {self.instance_id[:8]}"
        selector = selector_of(task.reader)
        if isinstance(task, CardOperationTask) and task.when_present:
            present = await self._reader_holding(card_id, selector)
            if present is None:
                self._tell(index, task, f"{task.type} skipped: the card is in no reader (when_present)")
                return
            selector = present
        order = CardTaskOrder(PRODUCTION if isinstance(task, CardProductionTask) else OPERATION, card_template,
                              encoding, selector, subject, fields, card_id,
                              process_instance_id=self.instance_id, task_index=index,
                              holder=self._render(task.holder) if isinstance(task, CardProductionTask)
                              and task.holder else None,
                              take_over=isinstance(task, CardProductionTask) and task.reissue,
                              variables=self._text_variables())

        def relay(p: Progress) -> None:
            if p.task is None:
                self._tell(index, task, p.message)

        outcome = await self.s.card_tasks.run(order, relay)
        # C13: the generated certificates' descriptors go to the process map, also on failure
        # so that the error path can handle them.
        for field_name, descriptor in outcome.return_fields.items():
            variable = variable_of(task.fields[field_name])
            assert variable is not None  # the configuration maps return fields to a ${variable} (C13)
            self.process_map[variable] = descriptor
        if isinstance(task, CardProductionTask) and task.card and outcome.card:
            self.process_map[task.card] = outcome.card
        if not outcome.succeeded:
            raise outcome.error or CardlineError("card task failed")
        self._tell(index, task, f"{task.type} succeeded (task {outcome.task.id})")

    async def _reader_holding(self, card_id: str | None, selector: ReaderSelector) -> ReaderSelector | None:
        """The reader (within `selector`) that holds the card right now, by its serial; None if none."""
        if card_id is None:
            return None
        card = await asyncio.to_thread(self.s.store.cards.get, card_id)
        for pooled in self.s.card_tasks.pool.list(selector):
            reader = pooled.reader
            if reader.card_present and card.serial in (reader.token_serial, reader.atr.hex()):
                return replace(selector, gateway_id=pooled.gateway_id, reader_id=reader.reader_id)
        return None

    async def _change_state(self, index: int, task: ChangeStateTask) -> None:
        if task.certificates:
            for d in self._descriptors(task.certificates, CERTIFICATE):
                record = await asyncio.to_thread(self.s.certificates.change_state, d.id, task.state, task.reason,
                                                 self.actor)
                self._tell(index, task, f"certificate {record.serial_hex} is {record.state}")
            return
        assert task.card is not None  # the process reader requires certificates or card
        for d in self._descriptors(task.card, CARD):
            # The card's certificates follow it as its graph says (CA first, C17).
            change = await asyncio.to_thread(self.s.cards.change_state, d.id, task.state, task.reason,
                                             actor=self.actor)
            for step in change.certificates:
                self._tell(index, task, f"certificate {step.certificate_id}: " + (
                    f"left alone ({step.skipped})" if step.skipped else
                    f"{step.from_state} -> {step.to_state} ({step.action.name if step.action else 'store only'})"))
            self._tell(index, task, f"card {change.card.serial} is {change.card.state}")

    async def _handle_issued(self, index: int, task: HandleIssuedTask) -> None:
        if task.certificates:
            value = self.process_map.get(task.certificates)
            if value is None:        # the task that would have written it never ran: nothing to handle
                self._tell(index, task, f"no certificate in {task.certificates!r}: nothing to handle")
                return
            ids = [d.id for d in self._descriptors(task.certificates, CERTIFICATE)]
        else:                        # every certificate of this instance still in the internal issued state
            records = await asyncio.to_thread(self.s.store.certificates.list,
                                              state=self.s.configuration.templates.internal_issued_state,
                                              process_instance_id=self.instance_id)
            ids = [r.id for r in records]
        results = await asyncio.to_thread(self.s.certificates.handle_issued, ids, revoke_reason=task.revoke_reason,
                                          target_state=task.target_state, actor=self.actor)
        for r in results:
            self._tell(index, task, f"certificate {r.serial_hex}: " + (
                f"error {r.error}" if getattr(r, "error", None) else
                f"skipped ({r.skipped})" if getattr(r, "skipped", None) else
                f"{'revoked, ' if r.revoked else ''}{r.state}"))

    async def _load_certificates(self, index: int, task: LoadCertificatesTask) -> None:
        """The card's certificates matching the task's filters, as descriptors in `into`."""
        card = self._descriptors(task.card, CARD)
        if len(card) != 1:
            raise InvalidArgument(f"process variable {task.card!r} must hold one card descriptor", variable=task.card)
        expiring_before = valid_at = None
        if task.expiring_within_days is not None:
            days_text = self._render(task.expiring_within_days)
            if not days_text.isdigit():
                raise InvalidArgument(f"expiring_within_days must be a whole number of days, not {quoted(days_text)}",
                                      field="expiring_within_days")
            valid_at = dt.datetime.now(dt.UTC)
            expiring_before = valid_at + check_days(int(days_text), "expiring_within_days")
        records = await asyncio.to_thread(self.s.store.certificates.list, card_id=card[0].id, state=task.state,
                                          template=task.template, expiring_before=expiring_before,
                                          valid_at=valid_at)
        if task.at_least_one and not records:
            raise NotFound(f"no certificate of card {card[0].id} matches (state {task.state or 'any'}, template "
                           f"{task.template or 'any'}, expiring within {task.expiring_within_days or 'any'} days)",
                           card_id=card[0].id)
        self.process_map[task.into] = [CoreObjectDescriptor(CERTIFICATE, r.template, r.id) for r in records]
        self._tell(index, task, f"{len(records)} certificate(s) of card {card[0].id} loaded into {task.into!r}: "
                   + (", ".join(r.serial_hex for r in records) or "none"))
