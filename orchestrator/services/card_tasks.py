"""Card tasks: an encoding description run on one card, step by step, under the certificate
rules.

card_production creates the card object; card_operation works on the card of the process
map, or on none (C8). For each application, in order: a certificate is requested for a key
generated on the card (or in the orchestrator and archived, `ArchiveKey`), committed in the
internal issued state before the card is asked to store it (C1), held at the CA right away
when `revokeOnIssue` (C6), related to the card at once when `CreateObjectRelation=always`
(C9); a recovered certificate is written with its archived key, never stored again nor
moved (C7). When the whole task succeeds its certificates move to their start state with
the `success` relations in one transaction (C2, C10); when it fails they stay in the
internal issued state carrying the error (C3). Return fields get the CoreObjectDescriptors
either way (C13).

C16: every CA request is journaled (idempotency key "task:step:application" and the CSR)
before the CA is called; the certificate and the journal row's move to `stored` are one
transaction; the row becomes `written` once the card holds the certificate. The service
keeps the ids of the tasks it is running (`running`): a RUNNING task no live run owns was
left by a crash, and the reconciler (services/reconciler.py) ends it.

Takeover (C16, docs/rules.md): a task of a replica that died may be resumed by another
(services/processes.py decides, orchestrator/domain/takeover.py) as a replay: `run(...,
resumed=the task's row)` runs the task again under its task id without creating it anew.
Every step keeps its number, so a step the dead run sent is answered from the gateway's step
memo (the same generated keys) and a step it never sent runs now; a step whose name differs
from the journal's fails the task (the replay diverged). The card object the dead run stored
is the task's; a CA request it journaled is settled from the journal: its stored certificate
is reused, a pending one is asked for at the CA (find_issued, as the reconciler does) and
issued only when the CA has none for it — never issued twice.

Store transactions: a write that need not be durable on its own waits (`_defer`) and is
committed with the next one that must be (`_write`, Store.together): every step's journal
entry, every CA request's, the task's end. Nothing is sent to a card or a CA while a write
waits, so what the rules order before a step or a CA call is committed before it: the task
with its start audit, the entry of its first step (reading the card, which changes nothing on
it), the card object and the next step's entry; a certificate (C1) with the entry of the step
that writes it; a row's move to `written` with whatever comes next; the task's end (C2, C3)
with its audit. A task that fails before any of that has its row, start and end in one.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from orchestrator.ca.base import CaConnector, requested_beyond
from orchestrator.domain.encoding import Application, CreateObjectRelation, EncodingDescription, parse_apdu_script
from orchestrator.domain.processes import CoreObjectDescriptor, ExpressionError, render
from orchestrator.domain.templates import DEFAULT_RELATION_TYPE, CardTemplate, CertificateTemplate, Templates
from orchestrator.services.auditing import acting
from orchestrator.services.card_secrets import CardPukStore
from orchestrator.services.certificate_content import issue_profile, missing_variables
from orchestrator.services.key_archive import KeyArchive, generate_key
from orchestrator.services.pool import Lease, ReaderPool, ReaderSelector
from orchestrator.store.records import (
    AUDIT_CSR_IGNORED,
    AUDIT_RECOVER,
    AUDIT_REVOKE_ON_ISSUE,
    AUDIT_TASK_FINISHED,
    AUDIT_TASK_STARTED,
    CARD,
    CERTIFICATE,
    TASK,
    AuditSubjects,
    CaRequestRecord,
    CaRequestState,
    CertificateRecord,
    NewRelation,
    TaskRecord,
    TaskState,
    WrappedKey,
    certificate_subject,
)
from orchestrator.store.store import Store
from shared import cards
from shared.errors import (
    CardlineError,
    CsrInvalid,
    EncodingFailed,
    InvalidArgument,
    StepOutcomeMismatch,
    from_details,
)
from shared.logging import get_logger
from shared.transport_puk import TransportPukRule
from shared.transport_puk import read_key_file as read_transport_key

log = get_logger(__name__)

PRODUCTION, OPERATION = "card_production", "card_operation"
# Named points between the steps of a task; tests and fault injection hook in here.
#   before_issue   the CA request is journaled, the CA not called yet
#   after_issue    the CA answered; the certificate is not stored yet
#   after_store    the certificate is committed (C1) with the write step's journal entry;
#                  the card write not sent yet
#   write_sent     the write step is handed to the gateway; its answer not processed yet
#   after_write    the card holds the certificate
#   before_finish  every application done; the final transition (C2) not made yet
BOUNDARIES = ("before_issue", "after_issue", "after_store", "write_sent", "after_write", "before_finish")
BoundaryHook = Callable[[str, str], Awaitable[None]]   # (boundary, task_id)


@dataclass(frozen=True)
class CardTaskOrder:
    type: str                                   # PRODUCTION or OPERATION
    card_template: CardTemplate
    encoding: EncodingDescription
    selector: ReaderSelector
    subject: str
    # Field values by field name: text for inputs (PINs pass through here, in memory only),
    # CoreObjectDescriptors for fields naming stored objects (RecoverCertificate, ...).
    fields: Mapping[str, object] = field(default_factory=dict, repr=False)
    card_id: str | None = None                  # card_operation: the card of the process map
    take_over: bool = False                     # card_production: re-issue a card that holds a live card object
    process_instance_id: str | None = None
    task_index: int | None = None
    holder: str | None = None                   # card_production: who the card is for
    # What certificate templates' subject patterns and subjectAltName rules may read (the
    # process's inputs; never a secret), besides the built-in card_id and holder.
    variables: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _DeferredWrite:
    """A store write waiting for the card task's next _write; its result once committed."""
    call: Callable[[], Any]
    then: Callable[[Any], None] | None = None
    if_lost: Callable[[], None] | None = None
    result: Any = None


@dataclass(frozen=True)
class CardTaskOutcome:
    task: TaskRecord
    card: CoreObjectDescriptor | None
    return_fields: dict[str, CoreObjectDescriptor]   # field name -> generated certificate (C13)

    @property
    def succeeded(self) -> bool:
        return self.task.state == TaskState.SUCCEEDED

    @property
    def error(self) -> CardlineError | None:
        return task_error(self.task)


def task_error(task: TaskRecord) -> CardlineError | None:
    """The error a failed task ended with, as it was raised: the same class with the same
    typed attributes, rebuilt from the row (reason, message, details)."""
    if task.error_reason is None:
        return None
    return from_details(task.error_reason, task.error_message or "", task.error_details)


@dataclass(frozen=True)
class Progress:
    task_id: str
    step_number: int
    message: str
    task: TaskRecord | None = None            # set on the last event
    certificate_ids: tuple[str, ...] = ()     # the certificates the task stored (last event)


ProgressSink = Callable[[Progress], None]


class TaskObserver(Protocol):
    """What card tasks tell the metrics (orchestrator/metrics.py); the default does nothing.
    outcome: the task's end state (SUCCEEDED, FAILED); reason: the error reason or None."""
    def task_finished(self, task_type: str, outcome: str, seconds: float, reason: str | None) -> None: ...
    def ca_called(self, ca: str, operation: str, seconds: float, reason: str | None) -> None: ...


_NO_LOGIN = (cards.ReadCardInfo, cards.RunApduScript)     # operations that never use the user PIN


class _Unobserved:
    def task_finished(self, task_type: str, outcome: str, seconds: float, reason: str | None) -> None:
        pass

    def ca_called(self, ca: str, operation: str, seconds: float, reason: str | None) -> None:
        pass


class CardTaskService:
    def __init__(self, store: Store, pool: ReaderPool, cas: dict[str, CaConnector], templates: Templates, *,
                 key_archive: KeyArchive | None = None, step_timeout_s: float = 120.0,
                 default_relation_type: str = DEFAULT_RELATION_TYPE, boundary: BoundaryHook | None = None,
                 owner_id: str | None = None, card_puks: CardPukStore | None = None,
                 observer: TaskObserver | None = None) -> None:
        self.store = store
        self.observer: TaskObserver = observer or _Unobserved()
        self.pool = pool
        self.cas = cas
        self.templates = templates
        self.key_archive = key_archive
        self.step_timeout_s = step_timeout_s
        self.default_relation_type = default_relation_type
        self.boundary = boundary
        # C16: who runs the tasks (stored with each task) and which ones run here right now.
        self.owner_id = owner_id
        self.running: set[str] = set()
        self.card_puks = card_puks              # each card's own PUK, sealed (unblock-pin)

    def validate(self, order: CardTaskOrder) -> None:
        """Everything that can be refused before a card is touched or a CA is asked."""
        if order.type not in (PRODUCTION, OPERATION):
            raise InvalidArgument(f"unknown card task type {order.type!r}", field="type")
        try:
            x509.Name.from_rfc4514_string(order.subject)
        except ValueError as exc:
            raise InvalidArgument(f"subject {order.subject!r} is not an RFC 4514 name: {exc}",
                                  field="subject") from None
        for app in order.encoding.applications:
            where = f"{order.encoding.source}:{app.line}: {app.name}"
            if app.issues_certificate:
                assert app.certificate_template is not None  # what issues_certificate means
                template = self.templates.certificate(app.certificate_template)
                if template.ca not in self.cas:
                    raise EncodingFailed(f"{where}: template {template.name!r} names unknown CA {template.ca!r}")
                missing = missing_variables(template, order.variables)
                if missing:
                    raise InvalidArgument(f"{where}: certificate template {template.name!r} reads "
                                          f"{', '.join(missing)} for the certificate's content, which this task "
                                          f"does not give (it gives: {', '.join(sorted(order.variables)) or 'none'})",
                                          template=template.name)
                if app.archive_key and self.key_archive is None:
                    raise EncodingFailed(f"{where}: ArchiveKey=true but no key archive is configured")
            if (app.create_object_relation is CreateObjectRelation.ALWAYS and app.puts_certificate_on_card
                    and order.type == OPERATION and order.card_id is None):
                # C9: fail before any CA request is sent.
                raise EncodingFailed(f"{where}: CreateObjectRelation=always needs a card, and the card operation "
                                     "has no card in the process map")
            if (app.is_recovery or app.write_cert_key_list) and self.key_archive is None:
                raise EncodingFailed(f"{where}: writing archived certificates and keys needs the key archive")
        for name in order.encoding.input_fields():
            if order.fields.get(name) in (None, ""):
                raise EncodingFailed(f"{order.encoding.source}: field {name!r} has no value")

    async def run(self, order: CardTaskOrder, progress: ProgressSink = lambda p: None, *,
                  task_id: str | None = None, resumed: TaskRecord | None = None) -> CardTaskOutcome:
        """task_id: chosen by the caller (recorded with a client's request id first), else new.
        resumed: the RUNNING task a dead replica left, taken over by this one: replayed under
        its id (task_id must be its id)."""
        self.validate(order)
        if resumed is not None and task_id != resumed.id:
            raise InvalidArgument("a resumed task runs under its own task id", task_id=resumed.id)
        # Registered before the task row exists, so the reconciler never takes a task that is
        # being created for one a crash left behind.
        task_id = task_id or str(uuid.uuid4())
        self.running.add(task_id)
        try:
            async with self.pool.lease(order.selector) as lease:
                run = _CardTaskRun(self, task_id, lease, order, progress)
                if resumed is not None:
                    await run.resume_from(resumed)
                else:
                    self._created(run, task_id, lease, order)
                started = time.monotonic()
                outcome = await run.execute()
                self.observer.task_finished(order.type, outcome.task.state, time.monotonic() - started,
                                            outcome.task.error_reason)
                return outcome
        finally:
            self.running.discard(task_id)

    def _created(self, run: _CardTaskRun, task_id: str, lease: Lease, order: CardTaskOrder) -> None:
        """A new task's row and start audit, committed with the first write of its run (the
        journal entry of its first step that changes the card, or its end)."""
        run.task_exists = False
        run._defer_until_created(partial(self.store.tasks.create, order.type, lease.gateway_id,
                                         lease.reader.reader_id, order.card_id,
                                         process_instance_id=order.process_instance_id, task_index=order.task_index,
                                         owner=self.owner_id, task_id=task_id))
        run._defer_until_created(partial(self.store.audit.record, AUDIT_TASK_STARTED, TASK, task_id,
                                         acting("card_task"),
                                         {"type": order.type, "process_instance_id": order.process_instance_id,
                                          "card_template": order.card_template.name},
                                         subjects=AuditSubjects(card_id=order.card_id, task_id=task_id,
                                                                gateway_id=lease.gateway_id,
                                                                reader_id=lease.reader.reader_id)), audit=True)


class _CardTaskRun:
    """One card task: its step counter, the certificates and relations it has made so far."""

    def __init__(self, service: CardTaskService, task_id: str, lease: Lease, order: CardTaskOrder,
                 progress: ProgressSink) -> None:
        self.s = service
        self.task_id = task_id
        self.lease = lease
        self.order = order
        self.progress = progress
        self.step_number = 0
        self.serial = ""                                           # the card's, once read
        self.card_id: str | None = order.card_id
        self.holder = order.holder                                 # the stored card's, for an operation
        self.issued: dict[str, CertificateTemplate] = {}          # certificate id -> template
        self.issued_subjects: list[dict[str, str]] = []           # id, CA and serial of each, for the audit
        self.success_relations: list[NewRelation] = []
        self.return_fields: dict[str, CoreObjectDescriptor] = {}
        description = order.encoding.description
        self.user_pin = str(order.fields.get(description.pin_field, "")) if description.pin_field else ""
        self._waiting: list[_DeferredWrite] = []          # committed by the next _write, in order
        self._waiting_audits: list[_DeferredWrite] = []   # after them (audit rows go last: Store.together)
        # A replay (takeover): the task's row as the dead run left it, its step journal (step
        # number -> name) and its journaled CA requests (request id -> row).
        self.resumed: TaskRecord | None = None
        self.journal: dict[int, str] = {}
        self.requests: dict[str, CaRequestRecord] = {}
        self.task_exists = True            # False until a new task's row is committed (_created)
        # The writes that create a new task and the entries of the steps it sent before: deferred
        # again with the task's end when the write they waited for failed.
        self._creation: list[tuple[Callable[[], Any], bool]] = []

    async def resume_from(self, task: TaskRecord) -> None:
        """This run replays TASK (takeover): its journals are read, nothing is created."""
        steps = await self._db(self.s.store.tasks.steps, task.id)
        requests = await self._db(self.s.store.ca_requests.list, None, task.id)
        self.resumed = task
        self.journal = {step.step_number: step.name for step in steps}
        self.requests = {row.request_id: row for row in requests}

    def _defer_until_created(self, call: Callable[[], Any], *, audit: bool = False) -> None:
        """A write of a task whose row is not committed yet (_creation)."""
        self._creation.append((call, audit))
        self._defer(call, audit=audit, then=self._task_created)

    def _task_created(self, _result: Any) -> None:
        self.task_exists = True
        self._creation.clear()

    # --- plumbing ------------------------------------------------------------------------

    async def _db(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _defer(self, call: Callable[[], Any], *, audit: bool = False,
               then: Callable[[Any], None] | None = None,
               if_lost: Callable[[], None] | None = None) -> _DeferredWrite:
        """A store write (a bound store method) committed with the next _write. then: called
        with its result once committed; if_lost: called when that transaction fails."""
        deferred = _DeferredWrite(call, then, if_lost)
        (self._waiting_audits if audit else self._waiting).append(deferred)
        return deferred

    async def _write(self, *calls: Callable[[], Any]) -> list[Any]:
        """The deferred writes, CALLS, then the deferred audit rows, in ONE transaction (one
        trip to a worker thread); CALLS' results. When it fails nothing of it is written and
        the deferred writes are dropped (their if_lost runs): the task fails with the error."""
        waiting, audits = self._waiting, self._waiting_audits
        self._waiting, self._waiting_audits = [], []
        # Fencing (takeover): nothing is written once another replica has taken the task over.
        fence = [_DeferredWrite(partial(self.s.store.tasks.check_owner, self.task_id, self.s.owner_id))] \
            if self.s.owner_id else []
        everything = [*waiting, *fence, *(_DeferredWrite(call) for call in calls), *audits]
        try:
            results = await asyncio.to_thread(self.s.store.together, *(w.call for w in everything))
        except BaseException:
            for w in everything:
                if w.if_lost is not None:
                    w.if_lost()
            raise
        for w, result in zip(everything, results, strict=True):
            w.result = result
            if w.then is not None:
                w.then(result)
        return results[len(waiting) + len(fence):len(waiting) + len(fence) + len(calls)]

    async def _ca(self, ca: CaConnector, operation: str, call: Callable[..., Any], *args: Any) -> Any:
        """A CA call on a worker thread, timed and counted for the metrics."""
        started, reason = time.monotonic(), None
        try:
            return await asyncio.to_thread(call, *args)
        except CardlineError as exc:
            reason = exc.reason
            raise
        except Exception as exc:
            reason = type(exc).__name__
            raise
        finally:
            self.s.observer.ca_called(ca.name, operation, time.monotonic() - started, reason)

    async def _boundary(self, name: str) -> None:
        if self.s.boundary is not None:
            await self.s.boundary(name, self.task_id)

    def _tell(self, message: str, task: TaskRecord | None = None) -> None:
        self.progress(Progress(self.task_id, self.step_number, message, task,
                               tuple(self.issued) if task is not None else ()))

    async def _step(self, name: str, operation: cards.Operation, *, so_pin: str = "",
                    journaled_boundary: str | None = None, sent_boundary: str | None = None) -> cards.StepValue:
        # Journaled before it is sent, with the writes waiting (_defer): after a crash the
        # journal tells which step may have run. Its completion needs no write of its own:
        # the next journal entry, the stored certificate or the task's end records it, and
        # the gateway answers a resent (task, step) from its first result.
        await self._journal_step(name)
        if journaled_boundary is not None:
            await self._boundary(journaled_boundary)
        return await self._send(name, operation, so_pin=so_pin, sent_boundary=sent_boundary)

    async def _journal_step(self, name: str, *, reads_only: bool = False) -> None:
        """The step's journal entry, committed before it is sent; with READS_ONLY (a step that
        changes nothing on the card) it waits for the task's next write instead (_defer): a
        crash before that left nothing on the card to account for."""
        self.step_number += 1
        journaled = self.journal.get(self.step_number)
        if journaled is not None and journaled != name:
            raise EncodingFailed(f"the resumed task diverged from its journal: step {self.step_number} is "
                                 f"{journaled!r} in the journal, {name!r} in the replay")
        entry = partial(self.s.store.tasks.journal_step, self.task_id, self.step_number, name, "sent")
        if not reads_only:
            await self._write(entry)
        elif self.task_exists:
            self._defer(entry)
        else:
            self._defer_until_created(entry)

    async def _send(self, name: str, operation: cards.Operation, *, so_pin: str = "",
                    sent_boundary: str | None = None) -> cards.StepValue:
        # The user PIN goes only with steps that log in to the card.
        user_pin = "" if isinstance(operation, _NO_LOGIN) else self.user_pin
        sending = self._refusal_journaled(name, self.lease.run(
            cards.Step(operation, user_pin=user_pin, so_pin=so_pin), task_id=self.task_id,
            step_number=self.step_number, timeout_s=self.s.step_timeout_s))
        if sent_boundary is None or self.s.boundary is None:
            return await sending
        # The boundary runs while the step is in flight: one turn of the loop hands the
        # command to the gateway's stream, the hook runs, then the answer is awaited.
        in_flight = asyncio.ensure_future(sending)
        await asyncio.sleep(0)
        try:
            await self._boundary(sent_boundary)
        except BaseException:
            in_flight.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        return await in_flight

    def _where(self, *certificates: dict[str, str]) -> AuditSubjects:
        """Where this task acts, for its audit rows."""
        return AuditSubjects(card_id=self.card_id, task_id=self.task_id, gateway_id=self.lease.gateway_id,
                             reader_id=self.lease.reader.reader_id, step=self.step_number, certificates=certificates)
    async def _refusal_journaled(self, name: str, sending: Awaitable[cards.StepValue]) -> cards.StepValue:
        """SENDING's value; an answer of another kind of step (the pool refuses it) is also
        journaled on the step, then fails the task like any step error."""
        try:
            return await sending
        except StepOutcomeMismatch as exc:
            # With the writes waiting: the task's row may be one of them.
            await self._write(partial(self.s.store.tasks.journal_step, self.task_id, self.step_number, name,
                                      "refused", exc.message))
            raise

    def _relation_type(self, app: Application) -> str:
        return app.object_relation_type or self.s.default_relation_type      # C12

    async def _relate(self, app: Application, certificate_id: str) -> None:
        """C9–C11: `always` now (it survives a failed encoding), `success` at the end."""
        if self.card_id is None or app.create_object_relation is CreateObjectRelation.NEVER:
            return
        relation = NewRelation(CARD, self.card_id, CERTIFICATE, certificate_id, self._relation_type(app))
        if app.create_object_relation is CreateObjectRelation.ALWAYS:
            await self._db(self.s.store.relations.add, self.task_id, [relation])
        else:
            self.success_relations.append(relation)

    # --- the task --------------------------------------------------------------------------

    async def execute(self) -> CardTaskOutcome:
        store, order = self.s.store, self.order
        template = order.card_template
        # Reading the card changes nothing on it: its entry waits, with a new task's row and
        # start audit, for the task's next write (the card object with the next step's entry,
        # or the task's end).
        await self._journal_step("read_card_info", reads_only=True)
        try:
            info = await self._send("read_card_info", cards.ReadCardInfo())
            assert isinstance(info, cards.Reader)
            serial = self.serial = info.token_serial or info.atr.hex()
            if order.type == PRODUCTION and self.resumed is not None and self.resumed.card_id is not None:
                self.card_id = self.resumed.card_id     # stored by the run that died (takeover)
                self._tell(f"card {serial} in production (resumed)")
            elif order.type == PRODUCTION:          # C8: production creates the card object
                # One physical card, one live card object: a card that has one is refused
                # unless the process re-issues it (docs/lifecycle.md). Committed with the next
                # step's journal entry, before that step is sent; its id is chosen here, as the
                # certificate content of the next application may name it.
                self.card_id = str(uuid.uuid4())
                self._defer(partial(store.cards.create, self.task_id, serial, template.name, template.initial_state,
                                    self.lease.gateway_id, self.lease.reader.reader_id, identity=card_identity(info),
                                    take_over=order.take_over, holder=order.holder, card_id=self.card_id),
                            if_lost=self._card_not_created)
                self._tell(f"card {serial} ({info.token_label or info.name}) in production")
            elif self.card_id is not None:
                card = await self._db(store.cards.get, self.card_id)
                if card.serial != serial:
                    raise EncodingFailed(f"the card in {info.reader_id} (serial {serial}) is not card {card.id} "
                                         f"(serial {card.serial})")
                self.holder = card.holder
                self._tell(f"card {card.serial} found for the operation")
            await self._set_pins()
            for app in order.encoding.applications:
                await self._application(app)
            await self._boundary("before_finish")
            # C2: one transaction moves every certificate to its start state with the relations.
            finish = partial(store.finish_task_succeeded, self.task_id, self._internal_state(),
                             {cid: t.start_state for cid, t in self.issued.items()},
                             template.produced_state if order.type == PRODUCTION else None, self.success_relations)
            self._audit_finished(TaskState.SUCCEEDED, None)
            task, = await self._write(finish)
        except Exception as exc:  # whatever broke, the task ends in a defined state
            if not self.task_exists and not self._waiting:
                # The write that would have created the task failed (the card object refused,
                # ...): the task is created again, with its end. If that fails too there is
                # no task to end, and the error is the caller's.
                for call, audit in self._creation:
                    self._defer(call, audit=audit)
            if not isinstance(exc, CardlineError):
                log.exception("card task crashed", task_id=self.task_id)
                exc = CardlineError(f"{type(exc).__name__}: {exc}")
            log.warning("card task failed", task_id=self.task_id, reason=exc.reason, error=exc.message)
            # C3: certificates stay in the internal issued state, carrying the task's error.
            self._audit_finished(TaskState.FAILED, exc.reason)
            task, = await self._write(partial(store.finish_task_failed, self.task_id, exc.reason, exc.message,
                                              template.failed_state if order.type == PRODUCTION and self.card_id
                                              else None, details=exc.to_details()))
        ok = task.state == TaskState.SUCCEEDED
        self._tell(("card produced" if order.type == PRODUCTION else "card operation done") if ok
                   else f"{order.type} failed: {task.error_message}", task)
        card = CoreObjectDescriptor(CARD, template.name, self.card_id) if self.card_id else None
        return CardTaskOutcome(task, card, dict(self.return_fields))

    def _audit_finished(self, state: TaskState, error_reason: str | None) -> None:
        """The task's end, audited in the transaction that ends it."""
        self._defer(partial(self.s.store.audit.record, AUDIT_TASK_FINISHED, TASK, self.task_id, acting("card_task"),
                            {"type": self.order.type, "state": state, "error_reason": error_reason,
                             "steps": self.step_number},
                            subjects=self._where(*self.issued_subjects)), audit=True)

    def _card_not_created(self) -> None:
        self.card_id = None

    def _internal_state(self) -> str:
        states = {t.internal_issued_state for t in self.issued.values()}
        if len(states) > 1:
            raise EncodingFailed(f"certificate templates disagree on the internal issued state: {sorted(states)}")
        return states.pop() if states else self.s.templates.internal_issued_state

    async def _set_pins(self) -> None:
        """`SetPIN=true` sets the card's user PIN to the `PIN` field's value and, with
        `InitialPUK`, its PUK (SO PIN) to that field's value. The card is authenticated with its
        own PUK when the orchestrator keeps one for its token serial (services/card_secrets.py),
        otherwise with the PUK it left the factory with (derived for its token serial from the
        card template's transport PUK key); never with a PUK from the station. A PUK set here
        is sealed and kept at once: the card holds it from now on, whatever happens to the rest
        of the task.

        With `NewPIN` the holder changes the PIN: `PIN` is the current PIN, no PUK is involved."""
        description = self.order.encoding.description
        if not description.set_pin:
            return
        if description.new_pin_field:
            new_pin = str(self.order.fields.get(description.new_pin_field, ""))
            await self._step("change_pin", cards.SetPins(new_user_pin=new_pin))
            self.user_pin = new_pin
            self._tell("user PIN changed by the holder")
            return
        puk, whose = await self._puk()
        new_puk = str(self.order.fields.get(description.initial_puk_field or "", ""))
        pin, self.user_pin = self.user_pin, ""     # InitPIN runs logged in as SO, not as user
        await self._step("set_pins", cards.SetPins(new_user_pin=pin, new_so_pin=new_puk), so_pin=puk)
        self.user_pin = pin
        if new_puk and self.s.card_puks is not None:
            await self._db(self.s.card_puks.set, self.serial, new_puk, actor=acting(f"card_task:{self.task_id}"))
        self._tell(f"user PIN set with {whose}" + (" and a new PUK kept sealed" if new_puk else ""))

    async def _puk(self) -> tuple[str, str]:
        """The PUK that authenticates a PIN reset, and whose it is (for messages)."""
        if self.s.card_puks is not None:
            own = await self._db(self.s.card_puks.get, self.serial)
            if own is not None:
                return own, "the card's own PUK"
        template = self.order.card_template
        if not template.transport_puk_key_file:
            raise EncodingFailed(f"SetPIN=true in {self.order.encoding.source}, but no PUK is kept for card "
                                 f"{self.serial} and card template {template.name!r} names no "
                                 "transport_puk_key_file to authenticate the PIN change")
        # Derived for self.serial: the card this task read and recorded (production) or checked
        # against the card object (operation), never a serial a station names later.
        key = await asyncio.to_thread(read_transport_key, template.transport_puk_key_file)
        transport_puk = TransportPukRule(key, template.transport_puk_alphabet,
                                         template.transport_puk_length).puk_for(self.serial)
        return transport_puk, "the transport PUK"

    async def _application(self, app: Application) -> None:
        if app.delete_objects:
            await self._delete_objects(app)
        if app.is_recovery:
            await self._recover(app, self._certificate_descriptors(app, app.recover_certificate_field)[0])
        elif app.write_cert_key_list:     # certificate + key pairs from the archive, like recovery
            for descriptor in self._certificate_descriptors(app, app.cert_key_list_field, many=True):
                await self._recover(app, descriptor)
        elif app.write_certificate:       # a stored certificate for a key already on the card
            await self._write_stored_certificate(app, self._certificate_descriptors(app, app.certificate_field)[0])
        elif app.issues_certificate:
            await self._issue(app)
        for data_object in self._data_objects(app):
            await self._step(f"write_data_object:{app.name}", data_object)
            self._tell(f"data object {data_object.label!r} written ({app.name})")
        apdus = app.apdus
        if app.apdu_script_field:
            try:
                apdus = parse_apdu_script(str(self.order.fields[app.apdu_script_field]))
            except ValueError as exc:
                raise InvalidArgument(f"{app.name}: field {app.apdu_script_field}: {exc}") from None
        if apdus:
            await self._step(f"apdu_script:{app.name}", cards.RunApduScript(tuple(apdus)))
            self._tell(f"APDU script of {len(apdus)} commands run ({app.name})")

    async def _issue(self, app: Application) -> None:
        assert app.certificate_template is not None  # only applications that issue certificates come here
        template = self.s.templates.certificate(app.certificate_template)
        key_type = app.generate_key_pair or template.key_type
        label = app.key_label or template.name
        key_id = os.urandom(16)
        private_key = None
        # The certificate's content, decided before the card is touched; the card's CSR is
        # asked for this subject but contributes only its key and the proof of possession.
        profile = issue_profile(template, self.order.subject, self._content_variables())
        subject = profile.x509_subject().rfc4514_string()
        if app.archive_key:                 # generated here, archived, then imported onto the card
            private_key = await asyncio.to_thread(generate_key, key_type)
            csr_der = await asyncio.to_thread(_local_csr, private_key, subject)
            self._tell(f"key pair {key_type.value} generated for archival ({label})")
        else:
            generated = await self._step(f"generate_key_pair:{label}", cards.GenerateKeyPair(
                key_type, label, key_id, csr_subject=subject))
            assert isinstance(generated, cards.GeneratedKey)
            csr = check_proof_of_possession(generated)
            csr_der = generated.csr_der
            key_id = generated.key_id or key_id          # a replayed step answers with the first run's key
            self._tell(f"key pair {key_type.value} generated on the card ({label})")
            asked = requested_beyond(csr, profile)
            if asked:
                self._record_ignored_request(app, template, asked)

        ca = self.s.cas[template.ca]
        # The CA's idempotency key; keep its format stable (CAs key their records on it).
        request_id = f"{self.task_id}:{self.step_number}:{app.name}"
        settled = self.requests.get(request_id)
        if settled is not None and settled.state in (CaRequestState.STORED, CaRequestState.WRITTEN):
            await self._reuse_stored(app, template, ca, settled, key_id, label, private_key)
            return
        # C16: journaled, with the request, before the CA is called: whatever happens next,
        # the reconciler can ask the CA what it issued for it.
        await self._write(partial(self.s.store.ca_requests.journal, request_id, self.task_id, ca.name, template.name,
                                  csr_der))
        await self._boundary("before_issue")
        # A request the dead run journaled (takeover): what the CA issued for it, if anything,
        # before it is asked to issue (never issued twice).
        der = await self._issued_before(ca, request_id, csr_der) if settled is not None else None
        if der is None:
            der = await self._ca(ca, "issue", ca.issue, csr_der, profile, request_id)
        await self._boundary("after_issue")
        archived = None
        if private_key is not None:
            # Sealed under the key-encryption key before anything is stored, bound to this
            # certificate (issuer and serial) so the blob opens for no other one.
            cert = x509.load_der_x509_certificate(der)
            assert self.s.key_archive is not None  # validate() refuses ArchiveKey without a key archive
            archived = WrappedKey(*await asyncio.to_thread(
                self.s.key_archive.seal, private_key,
                archive_binding(cert.issuer.rfc4514_string(), format(cert.serial_number, "x"))))
        # C1: committed in the internal issued state before the card is asked to store it: with
        # the write step's journal entry, or at once when something else must follow it first.
        # C16: the journal row moves to `stored` in the same transaction.
        stored = self._defer(partial(self.s.store.store_issued_certificate, self.task_id, der, template.name,
                                     ca.name, template.internal_issued_state, archived_key=archived,
                                     request_id=request_id),
                             then=partial(self._stored, app, template, ca.name))
        relate_now = self.card_id is not None and app.create_object_relation is CreateObjectRelation.ALWAYS
        if relate_now or app.revoke_on_issue:
            await self._write()
            record = stored.result
            await self._relate(app, record.id)
        if app.revoke_on_issue:             # C6: held at the CA; the store state still follows C1/C2
            await self._ca(ca, "revoke", ca.revoke, record.serial, "certificateHold")
            await self._db(self.s.store.audit.record, AUDIT_REVOKE_ON_ISSUE, CERTIFICATE, record.id,
                           acting("card_task"), {"task_id": self.task_id, "reason": "certificateHold", "ca": ca.name},
                           subjects=self._where(certificate_subject(record.id, ca.name, record.serial_hex)))
            self._tell(f"certificate {record.serial_hex} put on hold at {ca.name} (revokeOnIssue)")

        if private_key is None:
            await self._step(f"write_certificate:{label}", cards.WriteCertificates(
                (cards.CertificateObject(key_id, label, der),)), journaled_boundary="after_store",
                sent_boundary="write_sent")
        else:
            await self._step(f"import_key_pair:{label}", cards.ImportKeyPair(
                key_id, label, _pkcs8(private_key), der), journaled_boundary="after_store", sent_boundary="write_sent")
        # Recorded with the next write (a step's entry, the task's end): until then the row
        # says `stored`, which a crash may leave as it would between the write and the mark.
        self._defer(partial(self.s.store.ca_requests.mark, request_id, CaRequestState.WRITTEN))
        record = stored.result
        if not (relate_now or app.revoke_on_issue):
            await self._relate(app, record.id)      # a `success` relation (C10): kept for the task's end
        self._tell(f"certificate {record.serial_hex} written next to its key ({label})")
        await self._boundary("after_write")

    async def _issued_before(self, ca: CaConnector, request_id: str, csr_der: bytes) -> bytes | None:
        """The certificate CA issued for a request the dead run journaled, found as the
        reconciler finds it (by request id, else by the request's key); None if none."""
        der = await self._ca(ca, "find_issued", ca.find_issued, request_id)
        finder = getattr(ca, "find_issued_for_key", None)
        if der is None and callable(finder) and not getattr(ca, "confirms_request_ids", False):
            spki = x509.load_der_x509_csr(csr_der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            found = await self._ca(ca, "find_issued", finder, spki)
            candidates = list(found) if isinstance(found, (list, tuple)) else [found] if found else []
            for candidate in candidates:
                if not await self._db(self.s.store.certificates.known, candidate):
                    return candidate
        if der is not None:
            log.info("resumed task: certificate found at the CA for its journaled request", request_id=request_id)
        return der

    async def _reuse_stored(self, app: Application, template: CertificateTemplate, ca: CaConnector,
                            row: CaRequestRecord, key_id: bytes, label: str, private_key: Any) -> None:
        """A replayed application whose certificate the dead run stored (C1): the stored one is
        written (the write step answered from the memo if it was sent), never issued again."""
        assert row.certificate_id is not None   # a stored or written row names its certificate
        assert private_key is None               # decide_takeover ends tasks with journaled ArchiveKey requests
        record = await self._db(self.s.store.certificates.get, row.certificate_id)
        self._stored(app, template, ca.name, record)
        relate_now = self.card_id is not None and app.create_object_relation is CreateObjectRelation.ALWAYS
        if relate_now:
            await self._relate(app, record.id)
        if app.revoke_on_issue:     # C6: asked again (the dead run may have died before); a retried hold is no error
            await self._ca(ca, "revoke", ca.revoke, record.serial, "certificateHold")
        await self._step(f"write_certificate:{label}", cards.WriteCertificates(
            (cards.CertificateObject(key_id, label, record.der),)), journaled_boundary="after_store",
            sent_boundary="write_sent")
        if row.state == CaRequestState.STORED:
            self._defer(partial(self.s.store.ca_requests.mark, row.request_id, CaRequestState.WRITTEN))
        if not relate_now:
            await self._relate(app, record.id)
        self._tell(f"certificate {record.serial_hex} written next to its key ({label}, resumed)")
        await self._boundary("after_write")

    def _stored(self, app: Application, template: CertificateTemplate, ca_name: str,
                record: CertificateRecord) -> None:
        """A certificate of this task is committed (C1): what the task keeps of it."""
        self.issued[record.id] = template
        self.issued_subjects.append(certificate_subject(record.id, ca_name, record.serial_hex))
        if app.return_field:                 # C13: set after success and after failure alike
            self.return_fields[app.return_field] = CoreObjectDescriptor(CERTIFICATE, template.name, record.id)
        self._tell(f"certificate {record.serial_hex} issued by {ca_name}, stored as {record.state}")

    def _content_variables(self) -> dict[str, str]:
        """What subject patterns and subjectAltName rules read: the task's variables and the
        built-in card_id and holder (when known)."""
        builtin = {"card_id": self.card_id, "holder": self.holder}
        return {**self.order.variables, **{k: v for k, v in builtin.items() if v}}

    def _record_ignored_request(self, app: Application, template: CertificateTemplate,
                                      asked: dict[str, Any]) -> None:
        """The station's CSR asked for more than its key: ignored (the CA issues the profile
        only), and recorded against the task, with the gateway as the one who asked."""
        gateway, reader = self.lease.gateway_id, self.lease.reader.reader_id
        log.warning("a card's certificate request asked for content it does not decide; ignored",
                    task_id=self.task_id, gateway_id=gateway, reader_id=reader, application=app.name,
                    asked=sorted(asked))
        # Committed with the CA request's journal row, before the CA is called.
        self._defer(partial(self.s.store.audit.record, AUDIT_CSR_IGNORED, TASK, self.task_id, f"gateway:{gateway}",
                            {"task_id": self.task_id, "step_number": self.step_number, "gateway_id": gateway,
                             "reader_id": reader, "application": app.name, "template": template.name,
                             "requested": asked}), audit=True)

    async def _delete_objects(self, app: Application) -> None:
        """DeleteObjects=true: every key and certificate on the card, by key id (a retired card)."""
        listing = await self._step(f"list_objects:{app.name}", cards.ListObjects())
        assert isinstance(listing, cards.ObjectListing)
        deleted = 0
        for key_id in dict.fromkeys(o.key_id for o in listing.objects if o.key_id):
            count = await self._step(f"delete_objects:{app.name}", cards.DeleteObjects(key_id))
            assert isinstance(count, cards.DeletedCount)
            deleted += count.count
        self._tell(f"{deleted} objects deleted from the card ({app.name})")

    def _data_objects(self, app: Application) -> list[cards.WriteDataObject]:
        """The application's data objects (docs/encoding-descriptions.md, "Data objects"):
        `DataObject=LABEL:VALUE`; `LabelExpressionDataObject=LABEL:VALUE` whose label takes
        `${FIELD}` values; `AttributesDataObject=application=A;label=L;value=V;private=true`."""
        found = []
        if app.data_object:
            label, _, value = app.data_object.partition(":")
            found.append(cards.WriteDataObject("cardline", label.strip(), value.strip().encode()))
        if app.label_expression_data_object:
            expression, _, value = app.label_expression_data_object.partition(":")
            try:
                label = render(expression.strip(), {k: v for k, v in self.order.fields.items() if isinstance(v, str)})
            except ExpressionError as exc:
                raise InvalidArgument(f"{app.name}: LabelExpressionDataObject: {exc}") from None
            found.append(cards.WriteDataObject("cardline", label, value.strip().encode()))
        if app.attributes_data_object:
            attributes = dict(part.strip().partition("=")[::2] for part in app.attributes_data_object.split(";")
                              if part.strip())
            unknown = sorted(attributes.keys() - {"application", "label", "value", "private"})
            if unknown or not attributes.get("label"):
                raise InvalidArgument(f"{app.name}: AttributesDataObject needs label= and takes application, "
                                      f"label, value, private"
                                      + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            found.append(cards.WriteDataObject(attributes.get("application", "cardline"), attributes["label"],
                                               attributes.get("value", "").encode(),
                                               attributes.get("private", "false").lower() == "true"))
        return found

    async def _write_stored_certificate(self, app: Application, descriptor: CoreObjectDescriptor) -> None:
        """`WriteCertificate`: a stored certificate written next to its key, which must be on the
        card already (found by its public key). Its state is not changed; related per
        CreateObjectRelation."""
        record = await self._db(self.s.store.certificates.get, descriptor.id)
        label = app.key_label or record.template
        await self._step(f"write_certificate:{label}", cards.WriteCertificates(
            (cards.CertificateObject(b"", label, record.der),)))
        await self._relate(app, record.id)
        self._tell(f"certificate {record.serial_hex} written to the card ({label})")

    def _certificate_descriptors(self, app: Application, field_name: str | None, many: bool = False
                                 ) -> list[CoreObjectDescriptor]:
        value = self.order.fields.get(field_name) if field_name is not None else None
        values = value if many and isinstance(value, list) else [value]
        descriptors = [v for v in values if isinstance(v, CoreObjectDescriptor) and v.type == CERTIFICATE]
        if not values or len(descriptors) != len(values):
            raise InvalidArgument(f"{app.name}: field {field_name} must hold "
                                  f"{'a list of ' if many else 'a '}certificate CoreObjectDescriptor"
                                  f"{'s' if many else ''}, not {type(value).__name__}")
        return descriptors

    async def _recover(self, app: Application, descriptor: CoreObjectDescriptor) -> None:
        """C7: an archived certificate and its key written to this card; never stored again,
        its state untouched; related per CreateObjectRelation; no return field."""
        record = await self._db(self.s.store.certificates.get, descriptor.id)
        archived = await self._db(self.s.store.archived_keys.get, record.id)
        assert self.s.key_archive is not None  # validate() refuses recovery without a key archive
        pkcs8 = await asyncio.to_thread(self.s.key_archive.open, archived.kek_id, archived.algorithm,
                                        archived.wrapped_key, archive_binding(record.issuer, record.serial_hex))
        label = app.key_label or record.template
        await self._step(f"recover_certificate:{label}", cards.ImportKeyPair(os.urandom(16), label, pkcs8, record.der))
        await self._relate(app, record.id)
        await self._db(self.s.store.audit.record, AUDIT_RECOVER, CERTIFICATE, record.id, acting("card_task"),
                       {"task_id": self.task_id, "card_id": self.card_id},
                       subjects=self._where(certificate_subject(record.id, record.ca_name, record.serial_hex)))
        self._tell(f"certificate {record.serial_hex} recovered onto the card ({label})")


def card_identity(info: cards.Reader) -> str | None:
    """Which physical card is in the reader: `pkcs11:<token serial>` for a token. None when the
    card gives no identifier of its own (a PC/SC card shows only its ATR, which names a card
    model, not a card): such a card is not bound (docs/lifecycle.md)."""
    if info.token_serial:
        return f"pkcs11:{info.token_serial}"
    return None


def archive_binding(issuer: str, serial_hex: str) -> str:
    """What an archived key is bound to: its certificate's issuer and serial."""
    return f"{issuer}|{serial_hex}"


def check_proof_of_possession(generated: cards.GeneratedKey) -> x509.CertificateSigningRequest:
    """The request must be signed by the key the card just generated; the request, checked."""
    try:
        csr = x509.load_der_x509_csr(generated.csr_der)
    except ValueError as exc:
        raise CsrInvalid(f"the card returned no valid certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrInvalid("the certificate request's signature does not verify")
    spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki != generated.public_key_der:
        raise CsrInvalid("the certificate request carries another key than the one generated on the card")
    return csr


def _local_csr(private_key, subject: str) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name.from_rfc4514_string(subject))
            .sign(private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def _pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
