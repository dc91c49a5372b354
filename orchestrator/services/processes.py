"""Process instances: a process definition's tasks run in order on a stored process map,
the on_error path when one fails. PINs and PUKs (secret inputs) pass through to the card
tasks and are never stored in the clear: while an instance runs they are kept sealed under the
key-encryption key (store.process_secrets, bound to the instance id) and dropped when it ends,
so that another replica can take the instance over when this one dies.

Takeover (C16, docs/rules.md): the reconciler hands a RUNNING card task of a replica whose
heartbeat lapsed to `claim` (its thread). The claim is one conditional UPDATE (one replica
wins); the winner waits a bounded time for the task's gateway to attach to it, decides from
the task's journals whether it can resume (orchestrator/domain/takeover.py), audits who took
what from whom, and then either replays the task under its task id and continues the process
instance with its next tasks, or ends the task with the reason (the next reconciler round
ends the instance consistently with its tasks)."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
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
from orchestrator.domain.takeover import (
    JournaledRequest,
    JournaledStep,
    TakeoverDecision,
    TakeoverView,
    decide_takeover,
)
from orchestrator.domain.templates import CardTemplate
from orchestrator.services.auditing import acting
from orchestrator.services.card_life import CardLifeService
from orchestrator.services.card_tasks import OPERATION, PRODUCTION, CardTaskOrder, CardTaskService, Progress
from orchestrator.services.certificates import CertificateService
from orchestrator.services.configuration import Configuration
from orchestrator.services.key_archive import open_json, seal_json
from orchestrator.services.pool import ReaderSelector, ReaderState, has_card
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.records import (
    AUDIT_PROCESS_FINISHED,
    AUDIT_PROCESS_STARTED,
    AUDIT_PROCESS_TASK,
    AUDIT_RECONCILE,
    CARD,
    CERTIFICATE,
    PROCESS_INSTANCE,
    TASK,
    ProcessInstanceRecord,
    ProcessState,
    TaskRecord,
    TaskState,
)
from orchestrator.store.store import Store
from shared import cards
from shared.errors import (
    CardlineError,
    EncodingFailed,
    InvalidArgument,
    NotFound,
    OrchestratorRestarted,
    StateConflict,
    quoted,
)
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


_SECRETS_CONTEXT = b"cardline/process-secrets/v1\x00instance:"


def _reader_serial(reader: cards.Reader) -> str | None:
    """The serial of the card in READER as a card task records it (token serial, else ATR)."""
    if not has_card(reader):
        return None
    return reader.token_serial or reader.atr.hex() or None


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
        # Takeover (enable_takeover): the loop the resumed runs go to, the bounded wait for a
        # task's gateway, and the runs in flight (kept referenced until they end).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.takeover_wait_s = 0.0
        self._takeovers: set[object] = set()

    # --- secret inputs, sealed while the instance runs -------------------------------------

    def _kek(self):
        archive = self.card_tasks.key_archive
        return archive.kek if archive is not None else None

    def _keep_secrets(self, instance_id: str, secrets: Mapping[str, str]) -> list[Callable[[], object]]:
        """The store call that keeps SECRETS sealed for the instance (none without secrets or
        KEK), to join the transaction that creates it."""
        kek = self._kek()
        if kek is None or not secrets:
            return []
        sealed = seal_json(kek, secrets, _SECRETS_CONTEXT + instance_id.encode())
        return [partial(self.store.process_secrets.put, instance_id, kek.kek_id, kek.algorithm, sealed)]

    def _open_secrets(self, instance_id: str) -> dict[str, str] | None:
        """The instance's secret inputs, or None when none are kept (or this KEK cannot open them)."""
        kek, row = self._kek(), self.store.process_secrets.find(instance_id)
        if kek is None or row is None or row.kek_id != kek.kek_id:
            return None
        try:
            opened = open_json(kek, row.sealed, _SECRETS_CONTEXT + instance_id.encode(), kek_id=row.kek_id)
        except CardlineError:
            log.warning("sealed process secrets do not open", process_instance_id=instance_id)
            return None
        return {str(k): str(v) for k, v in opened.items()}

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
            # The secrets are kept sealed (takeover) in the transaction that creates the instance.
            keep = await asyncio.to_thread(self._keep_secrets, instance_id, secrets)
            if request_id:
                # Secrets stay out of the fingerprint: it is stored.
                (instance, created), *_ = await asyncio.to_thread(
                    self.store.together, partial(
                        self.store.processes.create_once, name, process_map.to_dict(), request_id,
                        fingerprint(name, sorted(process_map.to_dict().items())),
                        owner=self.card_tasks.owner_id, instance_id=instance_id), *keep)
                if not created:
                    return await self._follow_first(instance, progress)
            else:
                instance, *_ = await asyncio.to_thread(
                    self.store.together, partial(self.store.processes.create, name, process_map.to_dict(),
                                                 owner=self.card_tasks.owner_id, instance_id=instance_id), *keep)
            run = _ProcessRun(self, definition, instance.id, process_map, secrets, progress)
            return await run.execute()
        finally:
            self.running.discard(instance_id)

    # --- takeover (C16) ------------------------------------------------------------------

    def enable_takeover(self, loop: asyncio.AbstractEventLoop, wait_s: float) -> None:
        """Resumed runs go to LOOP; a task's gateway is waited for at most WAIT_S seconds."""
        self._loop, self.takeover_wait_s = loop, wait_s

    def claim(self, task: TaskRecord) -> bool:
        """Called by the reconciler (its thread) for a RUNNING task of a replica whose heartbeat
        lapsed. True when the task is handled here: claimed (and resumed or ended by this
        replica) or claimed first by another replica; False when takeover is off (the
        reconciler ends the task as before)."""
        owner, loop = self.card_tasks.owner_id, self._loop
        if not owner or loop is None or loop.is_closed():
            return False
        # Registered before the claim, so this replica's reconciler never ends what it claims.
        self.card_tasks.running.add(task.id)
        if task.process_instance_id:
            self.running.add(task.process_instance_id)
        try:
            won = self.store.tasks.take_over(task.id, task.owner, owner)
        except BaseException:
            self._unregister(task)
            raise
        if not won:
            self._unregister(task)
            log.info("task claimed by another replica first", task_id=task.id, owner=task.owner)
            return True
        log.warning("task taken over", task_id=task.id, from_owner=task.owner, to_owner=owner)
        future = asyncio.run_coroutine_threadsafe(self._take_over(task), loop)
        self._takeovers.add(future)
        future.add_done_callback(self._takeovers.discard)
        return True

    def _unregister(self, task: TaskRecord) -> None:
        self.card_tasks.running.discard(task.id)
        if task.process_instance_id:
            self.running.discard(task.process_instance_id)

    async def _take_over(self, task: TaskRecord) -> None:
        try:
            attached, reader = await self._wait_for_reader(task.gateway_id, task.reader_id, self.takeover_wait_s)
            decision, resumable = await asyncio.to_thread(self._decide, task, attached, reader)
            await asyncio.to_thread(self.store.audit.record, AUDIT_RECONCILE, TASK, task.id, "reconciler", {
                "action": "take_over_task", "from_owner": task.owner, "to_owner": self.card_tasks.owner_id,
                "process_instance_id": task.process_instance_id, "resume": decision.resume,
                "reason": decision.reason})
            if not decision.resume or resumable is None:
                log.warning("taken-over task not resumable: ended", task_id=task.id, reason=decision.reason)
                await asyncio.to_thread(self._end_taken_task, task, decision.reason)
                return
            definition, instance, secrets = resumable
            log.warning("taken-over task resumed", task_id=task.id, reason=decision.reason)
            process_map = ProcessMap.from_dict(instance.process_map, secret_names=definition.secret_inputs)
            run = _ProcessRun(self, definition, instance.id, process_map, secrets, lambda p: None)
            assert task.task_index is not None   # _decide resumes only tasks with their place in the process
            await run.execute(start=task.task_index, resumed=task)
            # A resumed run that ended before the task ran again (its reader could not be had)
            # leaves the task RUNNING: it ends here with the reason, not at a later look.
            await asyncio.to_thread(self._end_taken_task, task, "the resumed run could not take the task's reader")
        except Exception as exc:  # the task and the instance must not stay RUNNING
            log.exception("takeover failed", task_id=task.id)
            await asyncio.to_thread(self._end_taken_task, task, f"the takeover failed: {type(exc).__name__}: {exc}")
        finally:
            await asyncio.to_thread(self.store.process_secrets.drop_ended)
            self._unregister(task)

    async def _wait_for_reader(self, gateway_id: str, reader_id: str,
                               wait_s: float) -> tuple[bool, cards.Reader | None]:
        """(whether the task's gateway is attached, the task's reader) once the gateway is
        attached with a card in that reader (a gateway fails over to another replica after its
        own died), or as they stand after WAIT_S seconds. The shared pool counts a gateway of
        a replica taken for dead as offline by the same staleness that drives this takeover,
        so an attached gateway is one linked to a live replica: this one or another."""
        pool = self.card_tasks.pool
        changed = asyncio.Event()
        unsubscribe = pool.subscribe(lambda kind, pooled: changed.set())
        deadline = time.monotonic() + wait_s
        try:
            # A view at least as fresh as the claim: one read before it may still count the dead
            # replica live, and its gateway attached through it.
            await pool.refresh()
            while True:
                online = [p for p in pool.list(ReaderSelector(gateway_id=gateway_id))
                          if p.state is not ReaderState.OFFLINE]
                found = [p.reader for p in online if p.reader.reader_id == reader_id]
                if found and has_card(found[0]):
                    return True, found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    return bool(online), found[0] if found else None
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(left, 1.0))
        finally:
            unsubscribe()

    def _decide(self, task: TaskRecord, attached: bool, reader: cards.Reader | None
                ) -> tuple[TakeoverDecision, tuple[ProcessDefinition, ProcessInstanceRecord, dict[str, str]] | None]:
        """Blocking: the decision over the task's journals, and what a resumed run needs."""
        steps = tuple(JournaledStep(s.step_number, s.name, s.state) for s in self.store.tasks.steps(task.id))
        requests = tuple(JournaledRequest(r.request_id, str(r.state))
                         for r in self.store.ca_requests.list(task_id=task.id))
        instance = self.store.processes.get(task.process_instance_id) if task.process_instance_id else None
        definition = self.configuration.processes.get(instance.definition) if instance is not None else None
        card_task = None
        if definition is not None and task.task_index is not None and task.task_index < len(definition.tasks):
            candidate = definition.tasks[task.task_index]
            if isinstance(candidate, (CardProductionTask, CardOperationTask)):
                card_task = candidate
        in_process = (instance is not None and instance.state == ProcessState.RUNNING and card_task is not None)
        secrets = None
        if instance is not None and definition is not None:
            secrets = self._open_secrets(instance.id) if definition.secret_inputs else {}
        card_serial = self.store.cards.get(task.card_id).serial if task.card_id else None
        view = TakeoverView(steps, requests, process_instance=in_process, secrets_kept=secrets is not None,
                            archive_applications=self._archive_applications(card_task, task),
                            gateway_attached=attached, card_serial=card_serial,
                            reader_serial=_reader_serial(reader) if reader is not None else None)
        decision = decide_takeover(view)
        if not decision.resume or instance is None or definition is None or secrets is None:
            return decision, None
        return decision, (definition, instance, secrets)

    def _archive_applications(self, card_task: CardProductionTask | CardOperationTask | None,
                              task: TaskRecord) -> frozenset[str]:
        if card_task is None:
            return frozenset()
        templates = self.configuration.templates
        try:
            template_name = card_task.card_template or (self.store.cards.get(task.card_id).template
                                                        if task.card_id else "")
            encoding_name = card_task.encoding if isinstance(card_task, CardOperationTask) and card_task.encoding \
                else (templates.card(template_name).encoding if template_name else "")
        except CardlineError:
            return frozenset()
        encoding = self.configuration.encodings.get(encoding_name)
        return frozenset(a.name for a in encoding.applications if a.archive_key) if encoding else frozenset()

    def _end_taken_task(self, task: TaskRecord, reason: str) -> None:
        """Blocking: a taken-over task that cannot resume ends FAILED as the reconciler ends an
        orphaned one (C3, C4: its card to the failed state, its certificates stay issued)."""
        error = OrchestratorRestarted(f"the orchestrator running this task ({task.owner or 'unknown'}) stopped; "
                                      f"{self.card_tasks.owner_id} took it over and ended it: {reason}")
        current = self.store.tasks.get(task.id)
        if current.state != TaskState.RUNNING:
            return
        card_state = None
        if current.type == PRODUCTION and current.card_id is not None:
            try:
                card_state = self.configuration.templates.card(self.store.cards.get(current.card_id).template
                                                               ).failed_state
            except CardlineError:
                card_state = None
        try:
            self.store.finish_task_failed(task.id, error.reason, error.message, card_state)
        except StateConflict:
            return
        self.store.audit.record(AUDIT_RECONCILE, TASK, task.id, "reconciler",
                                {"action": "end_taken_over_task", "reason": error.reason, "owner": task.owner,
                                 "card_state": card_state, "why": reason})

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

    async def _save_map(self, audited: Mapping[str, object] | None = None) -> None:
        """The process map saved; AUDITED: a task's outcome, audited in the same transaction."""
        audit = [self._audit_call(AUDIT_PROCESS_TASK, audited)] if audited is not None else []
        await asyncio.to_thread(self.s.store.together, partial(
            self.s.store.processes.update_map, self.instance_id, self.process_map.to_dict()), *audit)

    async def _taken_over(self) -> str | None:
        """The replica that took this instance over (this one was frozen, its heartbeat lapsed),
        or None while it is this replica's: a run that lost its instance writes no more."""
        owner = self.s.card_tasks.owner_id
        if not owner:
            return None
        current = (await asyncio.to_thread(self.s.store.processes.get, self.instance_id)).owner
        return current if current not in (None, owner) else None

    async def _audit(self, action: str, detail: Mapping[str, object]) -> None:
        await asyncio.to_thread(self._audit_call(action, detail))

    def _audit_call(self, action: str, detail: Mapping[str, object]) -> Callable[[], object]:
        """The audit row of ACTION on this instance, as a store call (for Store.together)."""
        return partial(self.s.store.audit.record, action, PROCESS_INSTANCE, self.instance_id, self.actor,
                       {"process": self.definition.name, **detail})

    async def execute(self, start: int = 0, resumed: TaskRecord | None = None) -> ProcessInstanceRecord:
        """Runs the tasks from index START; RESUMED: the card task at START that a dead replica
        ran, replayed under its task id (takeover)."""
        error: CardlineError | None = None
        taken_by: str | None = None
        if resumed is None:
            await self._audit(AUDIT_PROCESS_STARTED, {"inputs": sorted(self.process_map)})
        for index, task in enumerate(self.definition.tasks):
            if index < start:
                continue
            succeeded: Mapping[str, object] | None = None     # audited with the map saved after it
            try:
                if resumed is not None and index == start and isinstance(task, (CardProductionTask,
                                                                                CardOperationTask)):
                    await self._card_task(index, task, resumed)
                else:
                    await self._run_task(index, task)
                succeeded = {"index": index, "type": task.type, "outcome": "succeeded"}
            except Exception as exc:  # the instance always ends in a defined state
                error = _as_cardline_error(exc)
                self._tell(index, task, f"{task.type} failed: {error.reason}: {error.message}")
                await self._audit(AUDIT_PROCESS_TASK, {"index": index, "type": task.type, "outcome": "failed",
                                                       "error_reason": error.reason})
                break
            finally:
                # A failed task may mean this replica lost the instance (it was frozen and another
                # took it over, fenced): then it writes nothing more, not even the map.
                taken_by = await self._taken_over() if error is not None else None
                if taken_by is None:
                    await self._save_map(succeeded)
        if taken_by is not None:
            log.warning("process instance taken over by another replica: this run stops", instance=self.instance_id,
                        taken_by=taken_by)
            instance = await asyncio.to_thread(self.s.store.processes.get, self.instance_id)
            self.progress(ProcessProgress(self.instance_id, len(self.definition.tasks), "",
                                          f"process {self.definition.name} taken over by {taken_by}", False, instance))
            return instance
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
        # The instance's end drops its sealed secrets and is audited in the same transaction.
        state = ProcessState.FAILED if error else ProcessState.SUCCEEDED
        instance, *_ = await asyncio.to_thread(self.s.store.together, partial(
            self.s.store.processes.finish, self.instance_id, state, error.reason if error else None,
            error.message if error else None, self.process_map.to_dict()),
            partial(self.s.store.process_secrets.drop, self.instance_id),
            self._audit_call(AUDIT_PROCESS_FINISHED, {"state": state, "error_reason": error.reason if error else None}))
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

    async def _card_task(self, index: int, task: CardProductionTask | CardOperationTask,
                         resumed: TaskRecord | None = None) -> None:
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
        if resumed is not None:                 # the reader the dead replica's run held
            selector = replace(selector, gateway_id=resumed.gateway_id, reader_id=resumed.reader_id)
        elif isinstance(task, CardOperationTask) and task.when_present:
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

        outcome = await self.s.card_tasks.run(order, relay, task_id=resumed.id if resumed else None,
                                              resumed=resumed)
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
