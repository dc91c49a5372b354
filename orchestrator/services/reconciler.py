"""The reconciler (rule C16): no certificate a CA issued for cardline is unknown to the
store, and no task or process instance stays RUNNING after the run that owned it is gone.

One round (`reconcile_once`), at start-up before the orchestrator serves and then every
`reconcile_interval_s`:

(b) Orphans first. A RUNNING task or process instance is orphaned when no live run owns it:
    - owned by this orchestrator (its stable id, one per data directory) or by nobody, and
      not in the in-memory registries of the card task / process services: a crash or a
      kill left it. At start-up the registries are empty, so every one of ours is orphaned.
    - owned by another orchestrator (replicas on one PostgreSQL) whose heartbeat is older
      than `stale_after`: that replica is gone. A replica that beats is left alone.
    Takeover: a RUNNING task of another replica whose heartbeat lapsed goes to `take_over`
    when one is given (services/processes.py ProcessService.claim): the replica that wins the
    claim (one conditional UPDATE) resumes it from its journals or ends it with the reason,
    and adopts its process instance (docs/rules.md, C16 "Takeover"); counted in
    `tasks_taken_over`. Without `take_over`, and for this orchestrator's own tasks, as below.
    An orphaned task ends FAILED with ORCHESTRATOR_RESTARTED: a production's card goes to
    its template's failed state, its certificates stay in the internal issued state carrying
    the error (C3, C4), exactly as if the task had failed by itself. An orphaned process
    instance ends consistently with its tasks (tasks first, so they have ended by then):
    SUCCEEDED when its last task is the last task of its definition and every task
    SUCCEEDED (the run died between its last task and its own end); FAILED with the error of
    its first failed task; else FAILED with ORCHESTRATOR_RESTARTED. Its on_error tasks are
    not run (the certificates are searchable and can be handled: C5).

(c) Interrupted certificate handlings. A handling writes its intent before it asks the CA
    (orchestrator/services/handling_intents.py). For every intent whose run is gone (not in
    the certificate service's registry), the certificate's CA status is read from the CA's
    CRL: if the CA did what the handling asked (revoked with the reason, held, hold lifted)
    while the store has not made all the handling's moves, the remaining moves are made
    (action "finish_interrupted_handling"); then the intent is settled. A CA that cannot be
    asked leaves the intent for the next round.

(a) Then every journal row still `pending`, whose task is no longer RUNNING (the request of
    a live run is that run's business): its CA is asked `find_issued(request_id)` and, if
    the connector offers it and cannot confirm request ids by itself (`confirms_request_ids`
    false or absent), `find_issued_for_key(spki)`: the oldest certificate for the request's
    public key that the store does not know yet is that request's.
    - found: stored in the internal issued state with the task's error (C3-C5 apply: it is
      searchable, handle_issued or the sweeper can revoke it); row -> `stored`.
    - not found: row -> `not_issued`. The request is not retried: its task has ended, so a
      certificate issued now would reach no card and only need revoking.
    - CA unreachable (or unknown to this orchestrator): row stays `pending` with the error,
      asked again next round.
    A certificate issued for an ArchiveKey application whose answer was lost is stored
    without an archived key: the orchestrator-generated key died with the run, so that
    certificate can never be recovered and should be revoked.

Every action is audited (action "reconcile"). Rounds are serialised; the store methods make
each step safe against a live run or another replica doing the same at the same time.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from orchestrator.ca.base import REVOCATION_REASONS, CaConnector
from orchestrator.services import handling_intents
from orchestrator.services.handling_intents import HandlingIntent
from orchestrator.store.records import (
    AUDIT_RECONCILE,
    CERTIFICATE,
    PROCESS_INSTANCE,
    TASK,
    CaRequestRecord,
    CaRequestState,
    ProcessInstanceRecord,
    ProcessState,
    TaskRecord,
    TaskState,
)
from orchestrator.store.store import DuplicateCertificate, Store
from shared.errors import CardlineError, OrchestratorRestarted, StateConflict
from shared.logging import get_logger

log = get_logger(__name__)

ACTOR = "reconciler"
PRODUCTION = "card_production"     # card_tasks.PRODUCTION (not imported: no cycle, no grpc)


@dataclass(frozen=True)
class ReconcileReport:
    examined: int = 0       # journal rows looked at (pending ones whose task has ended)
    stored: int = 0         # certificates found at a CA and stored in the internal issued state
    not_issued: int = 0     # rows the CA issued nothing for
    tasks_ended: int = 0    # orphaned tasks and process instances ended FAILED
    still_pending: int = 0  # rows left pending (CA unreachable, unknown CA)
    handlings_finished: int = 0   # interrupted certificate handlings finished in the store
    tasks_taken_over: int = 0     # RUNNING tasks of lapsed replicas handed to the takeover


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _crl_reason(revoked: x509.RevokedCertificate) -> str:
    """The RFC 5280 name of a CRL entry's reason (no reason extension: unspecified)."""
    try:
        flag = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return "unspecified"
    return next((name for name, f in REVOCATION_REASONS.items() if f == flag), "unspecified")


def _spki_of_csr(csr_der: bytes) -> bytes | None:
    try:
        return x509.load_der_x509_csr(csr_der).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None


class Reconciler:
    def __init__(self, store: Store, cas: Mapping[str, CaConnector], templates_internal_issued_state: str, *,
                 owner_id: str | None = None,
                 live_tasks: Callable[[], Collection[str]] = frozenset,
                 live_processes: Callable[[], Collection[str]] = frozenset,
                 card_failed_state: Callable[[str], str | None] = lambda card_template: None,
                 stale_after: dt.timedelta = dt.timedelta(minutes=3),
                 process_task_count: Callable[[str], int | None] = lambda definition: None,
                 live_handlings: Callable[[], Collection[str]] = frozenset,
                 take_over: Callable[[TaskRecord], bool] | None = None) -> None:
        """owner_id: this orchestrator's id (tasks.owner); live_tasks / live_processes: ids
        of the tasks and process instances running in this process right now;
        card_failed_state: card template name -> the state of a card whose production
        failed; stale_after: how old another orchestrator's heartbeat must be before its
        RUNNING work counts as orphaned; process_task_count: process definition name -> the
        number of its (main path) tasks, None if unknown; live_handlings: ids of the
        certificates being handled in this process right now; take_over: hands a RUNNING task
        of a replica whose heartbeat lapsed to the takeover (True: handled there, claimed here
        or by another replica; False: end it here as an orphan)."""
        self.store = store
        self.cas = cas
        self.internal_issued_state = templates_internal_issued_state
        self.owner_id = owner_id
        self.live_tasks = live_tasks
        self.live_processes = live_processes
        self.card_failed_state = card_failed_state
        self.stale_after = stale_after
        self.process_task_count = process_task_count
        self.live_handlings = live_handlings
        self.take_over = take_over
        self._round = threading.Lock()
        self._intents = handling_intents.OpenIntents(store)

    # -- a round ---------------------------------------------------------------------------

    def reconcile_once(self) -> ReconcileReport:
        """One round, blocking (call it through asyncio.to_thread from async code)."""
        with self._round:
            if self.owner_id:
                self.store.instances.beat(self.owner_id)
            tasks_ended, taken_over = self._end_orphans()
            # The sealed secret inputs of instances that have ended (a run that died, an
            # instance ended above) go with them (docs/rules.md, C16 "Takeover").
            self.store.process_secrets.drop_ended()
            examined = stored = not_issued = still_pending = 0
            for row in self.store.ca_requests.list(states=[CaRequestState.PENDING]):
                task = self.store.tasks.get(row.task_id)
                if task.state == TaskState.RUNNING:
                    continue                   # a live run (here or on a beating replica) settles it
                examined += 1
                try:
                    outcome = self._settle(row)
                except Exception as exc:  # one bad row must not stop the others
                    log.exception("CA request not settled", request_id=row.request_id)
                    outcome = self._still_pending(row, f"{type(exc).__name__}: {exc}")
                stored += outcome == CaRequestState.STORED
                not_issued += outcome == CaRequestState.NOT_ISSUED
                still_pending += outcome == CaRequestState.PENDING
            handlings_finished = self._settle_handlings()
            report = ReconcileReport(examined, stored, not_issued, tasks_ended, still_pending, handlings_finished,
                                     taken_over)
            if examined or tasks_ended or handlings_finished or taken_over:
                log.info("reconciled", examined=examined, stored=stored, not_issued=not_issued,
                         tasks_ended=tasks_ended, still_pending=still_pending,
                         handlings_finished=handlings_finished, tasks_taken_over=taken_over)
            return report

    def take_over_once(self) -> tuple[int, int]:
        """Between rounds, blocking: (tasks ended, tasks taken over) of runs whose orchestrator
        is gone - so that a dead replica's work moves once its heartbeat is
        replica.stale_after_s old, not at the next full round (which also settles CA requests)."""
        with self._round:
            ended, taken_over = self._end_orphans()
        if ended or taken_over:
            log.info("reconciled", tasks_ended=ended, tasks_taken_over=taken_over)
        return ended, taken_over

    # -- (b) orphaned tasks and process instances --------------------------------------------

    def _orphaned(self, owner: str | None, run_id: str, live: Collection[str],
                  heartbeats: Mapping[str, dt.datetime], now: dt.datetime) -> bool:
        if owner is None or owner == self.owner_id:
            return run_id not in live
        beat = heartbeats.get(owner)
        return beat is None or now - beat > self.stale_after

    def _end_orphans(self) -> tuple[int, int]:
        # The store first, the registries after: a run registers before its row exists and
        # unregisters after its row has ended, so a live run is never taken for an orphan.
        tasks = self.store.tasks.list(state=TaskState.RUNNING)
        instances = self.store.processes.list(state=ProcessState.RUNNING)
        live_tasks, live_processes = frozenset(self.live_tasks()), frozenset(self.live_processes())
        heartbeats, now = self.store.instances.heartbeats(), _utcnow()
        ended = taken_over = 0
        for task in tasks:
            if self._orphaned(task.owner, task.id, live_tasks, heartbeats, now):
                if self.take_over is not None and task.owner not in (None, self.owner_id) and self.take_over(task):
                    taken_over += 1
                    continue
                ended += self._end_task(task)
        adopted = frozenset(self.live_processes()) if taken_over else frozenset()
        for instance in instances:
            if instance.id in adopted:
                continue                     # adopted with its task just now: runs here
            if self._orphaned(instance.owner, instance.id, live_processes, heartbeats, now):
                ended += self._end_process(instance)
        return ended, taken_over

    def _restarted(self, what: str, owner: str | None) -> OrchestratorRestarted:
        return OrchestratorRestarted(f"the orchestrator running this {what} ({owner or 'unknown'}) stopped before "
                                     f"it ended; ended by the reconciler")

    def _end_task(self, task: TaskRecord) -> int:
        error = self._restarted("task", task.owner)
        card_state = None
        if task.type == PRODUCTION and task.card_id is not None:
            card_state = self.card_failed_state(self.store.cards.get(task.card_id).template)
        try:
            self.store.finish_task_failed(task.id, error.reason, error.message, card_state)
        except StateConflict:
            return 0                         # it ended meanwhile: someone else was faster
        self.store.audit.record(AUDIT_RECONCILE, TASK, task.id, ACTOR,
                                {"action": "end_orphaned_task", "reason": error.reason, "owner": task.owner,
                                 "card_state": card_state})
        log.warning("orphaned task ended", task_id=task.id, owner=task.owner, card_state=card_state)
        return 1

    def _process_outcome(self, instance: ProcessInstanceRecord,
                         tasks: list[TaskRecord]) -> tuple[ProcessState, str | None, str | None, str | None]:
        """(state, error reason, error message, the task it follows) for an orphaned instance."""
        count = self.process_task_count(instance.definition)
        main = [t for t in tasks if count is None or t.task_index is None or t.task_index < count]
        failed = next((t for t in main if t.state == TaskState.FAILED), None)
        if failed is not None:
            return ProcessState.FAILED, failed.error_reason, failed.error_message, failed.id
        last = max((t.task_index for t in main if t.task_index is not None), default=None)
        if count is not None and main and len(main) == len(tasks) and last == count - 1 \
                and all(t.state == TaskState.SUCCEEDED for t in main):
            return ProcessState.SUCCEEDED, None, None, main[-1].id
        error = self._restarted("process instance", instance.owner)
        return ProcessState.FAILED, error.reason, error.message, None

    def _end_process(self, instance: ProcessInstanceRecord) -> int:
        tasks = self.store.tasks.list(process_instance_id=instance.id)
        if any(t.state == TaskState.RUNNING for t in tasks):
            return 0                         # its task is live (or ends first, next round)
        state, reason, message, source = self._process_outcome(instance, tasks)
        try:
            self.store.processes.finish(instance.id, state, reason, message)
        except StateConflict:
            return 0
        self.store.audit.record(AUDIT_RECONCILE, PROCESS_INSTANCE, instance.id, ACTOR,
                                {"action": "end_orphaned_process", "state": state, "reason": reason,
                                 "owner": instance.owner, "following_task": source})
        log.warning("orphaned process instance ended", process_instance_id=instance.id, owner=instance.owner,
                    state=state, reason=reason)
        return 1

    # -- (c) interrupted certificate handlings -----------------------------------------------

    def _settle_handlings(self) -> int:
        # The store first, the registry after (as for orphans): a handling registers before
        # it writes its intent and unregisters after its moves.
        intents = self._intents.read()
        if not intents:
            return 0
        live = frozenset(self.live_handlings())
        crl_status: dict[str, dict[int, str] | None] = {}
        finished = 0
        for intent in intents:
            if intent.certificate_id in live:
                continue
            try:
                finished += self._settle_handling(intent, crl_status)
            except Exception:  # one bad intent must not stop the others
                log.exception("interrupted handling not settled", certificate_id=intent.certificate_id)
        return finished

    def _revoked_at_ca(self, ca_name: str, cache: dict[str, dict[int, str] | None]) -> dict[int, str] | None:
        """serial -> RFC 5280 reason name, from the CA's current CRL; None if it cannot be asked."""
        if ca_name not in cache:
            ca = self.cas.get(ca_name)
            try:
                crl = x509.load_der_x509_crl(ca.crl_der()) if ca is not None else None
            except (CardlineError, OSError, ValueError) as exc:
                log.warning("CA status not readable: interrupted handlings wait", ca=ca_name, error=str(exc))
                crl = None
            cache[ca_name] = None if crl is None else {r.serial_number: _crl_reason(r) for r in crl}
        return cache[ca_name]

    def _settle_handling(self, intent: HandlingIntent, crl_cache: dict[str, dict[int, str] | None]) -> int:
        cert = self.store.certificates.get(intent.certificate_id)
        sources = [src for src, _dst, _reason in intent.moves]
        final = intent.moves[-1][1] if intent.moves else None
        if cert.state not in sources or cert.state == final:      # every move made, or moved on since
            handling_intents.settle(self.store, intent, ACTOR, "done by the handling")
            return 0
        revoked = self._revoked_at_ca(intent.ca_name, crl_cache)
        if revoked is None:
            return 0                                               # asked again next round
        status = revoked.get(intent.serial)
        acted = status is None if intent.ca_action == "lift_hold" else status == intent.ca_reason
        if not acted:
            handling_intents.settle(self.store, intent, ACTOR, f"the CA did not act (status {status or 'valid'})")
            return 0
        for src, dst, reason in intent.moves[sources.index(cert.state):]:
            try:
                cert = self.store.certificates.change_state(
                    cert.id, dst, from_state=src, actor=ACTOR, action=AUDIT_RECONCILE, reason=reason,
                    detail={"action": "finish_interrupted_handling", "intent": intent.audit_id,
                            "ca": intent.ca_name, "serial_hex": intent.serial_hex, "ca_status": status or "valid",
                            "handling_actor": intent.actor})
            except StateConflict:
                return 0                     # moved meanwhile by someone else: next round looks again
        handling_intents.settle(self.store, intent, ACTOR, f"moves finished: {cert.state}")
        log.warning("interrupted certificate handling finished", certificate_id=cert.id, state=cert.state,
                    ca_status=status or "valid")
        return 1

    # -- (a) pending CA requests -------------------------------------------------------------

    def _settle(self, row: CaRequestRecord) -> str:
        ca = self.cas.get(row.ca_name)
        if ca is None:
            return self._still_pending(row, f"CA {row.ca_name!r} is not configured in this orchestrator")
        try:
            der = ca.find_issued(row.request_id)
            finder = getattr(ca, "find_issued_for_key", None)
            if der is None and callable(finder) and not getattr(ca, "confirms_request_ids", False):
                spki = _spki_of_csr(row.csr_der)
                if spki is not None:
                    found = finder(spki)       # bytes or None, or a list (oldest first)
                    candidates = list(found) if isinstance(found, (list, tuple)) else [found] if found else []
                    # A key may have older certificates (a renewal of the same key): the
                    # request's is the oldest one the store does not know yet.
                    der = next((c for c in candidates if not self.store.certificates.known(c)), None)
        except CardlineError as exc:     # CaUnavailable and the like: ask again next round
            return self._still_pending(row, f"{exc.reason}: {exc.message}")
        except OSError as exc:
            return self._still_pending(row, f"{type(exc).__name__}: {exc}")
        if der is None:
            try:
                self.store.ca_requests.mark(row.request_id, CaRequestState.NOT_ISSUED,
                                           f"CA {row.ca_name!r} issued nothing for this request")
            except StateConflict:
                return "raced"
            log.info("CA request not issued", request_id=row.request_id, ca=row.ca_name)
            return CaRequestState.NOT_ISSUED
        try:
            record = self.store.store_issued_certificate(row.task_id, der, row.template, row.ca_name,
                                                         self.internal_issued_state, request_id=row.request_id)
        except (DuplicateCertificate, StateConflict) as exc:
            # Known to the store already, under another request: not unknown, but this row
            # cannot say which; left for an operator with the reason.
            return self._still_pending(row, f"{exc.reason}: {exc.message}")
        self.store.audit.record(AUDIT_RECONCILE, CERTIFICATE, record.id, ACTOR,
                                {"action": "store_found_certificate", "request_id": row.request_id,
                                 "ca": row.ca_name, "serial_hex": record.serial_hex, "task_id": row.task_id})
        log.warning("certificate found at the CA and stored", request_id=row.request_id, ca=row.ca_name,
                    serial=record.serial_hex, state=record.state, certificate_id=record.id)
        return CaRequestState.STORED

    def _still_pending(self, row: CaRequestRecord, why: str) -> str:
        log.warning("CA request left pending", request_id=row.request_id, ca=row.ca_name, error=why)
        with contextlib.suppress(StateConflict):
            self.store.ca_requests.mark(row.request_id, CaRequestState.PENDING, why)
        return CaRequestState.PENDING
