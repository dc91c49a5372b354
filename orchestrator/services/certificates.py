"""Certificates after issuance: change state (C14), change state in the CA (C17), search
(C4) and handling (C5) of certificates left in the internal issued state.

Every action is audited in the store with the actor the caller names. All methods block
(store and CA calls); async callers wrap them in asyncio.to_thread.

Reference: docs/certificate-handling.md.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from orchestrator.ca.base import CaConnector, revocation_reason
from orchestrator.domain.ca_actions import REMOVE_FROM_CRL, CaAction, LiftHold, ca_action_for
from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.domain.state_graphs import DEFAULT_INTERNAL_ISSUED_STATE, IllegalMove, StateGraph
from orchestrator.services.handling_intents import record_intent
from orchestrator.store.records import CERTIFICATE, CertificateRecord, TaskState
from shared.errors import (
    CardlineError,
    ConfigurationError,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    TemplateNotFound,
    quoted,
)
from shared.tls import current_actor

log = logging.getLogger(__name__)

__all__ = ["CertificateService", "HandlingResult", "IssuedHit"]

# Audit actions written by this service.
AUDIT_CHANGE_STATE = "change_state"
AUDIT_CHANGE_STATE_IN_CA = "change_state_in_ca"
AUDIT_CHANGE_STATE_IN_CA_FAILED = "change_state_in_ca_failed"
AUDIT_HANDLE_ISSUED = "handle_issued"
AUDIT_HANDLE_ISSUED_FAILED = "handle_issued_failed"


@dataclass(frozen=True)
class HandlingResult:
    """What handle_issued did to one certificate."""

    certificate_id: str
    serial_hex: str | None      # None when the certificate does not exist
    revoked: bool               # revoked at its CA by this call
    state: str | None           # the store state after handling (None: certificate not found)
    error: str | None = None    # why handling failed ("REASON: message"); the others go on
    skipped: str | None = None  # why the certificate was left alone (not in Issued, task running)

    @property
    def handled(self) -> bool:
        return self.error is None and self.skipped is None


@dataclass(frozen=True)
class IssuedHit:
    """One certificate found in the internal issued state (C4)."""

    descriptor: CoreObjectDescriptor    # ("Certificate", template, id)
    serial_hex: str
    issuer: str
    subject: str
    ca_name: str
    created_at: dt.datetime             # received from the CA: the certificate's age
    task_id: str | None
    task_error_reason: str | None       # the error of the task that issued it (None: none recorded)
    task_error_message: str | None

    @property
    def id(self) -> str:
        return self.descriptor.id

    @property
    def template(self) -> str:
        return self.descriptor.template


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, CardlineError) else f"{type(exc).__name__}: {exc}"


def _error_detail(exc: BaseException) -> dict[str, str]:
    reason = exc.reason if isinstance(exc, CardlineError) else type(exc).__name__
    message = exc.message if isinstance(exc, CardlineError) else str(exc)
    return {"error_reason": reason, "error_message": message}


class CertificateService:
    def __init__(self, store, cas: Mapping[str, CaConnector], graphs: Mapping[str, StateGraph],
                 graph_of_template: Callable[[str], StateGraph | str],
                 internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE) -> None:
        """graph_of_template: certificate template name -> its state graph (or the graph's
        name, looked up in `graphs`); raises KeyError or TemplateNotFound for an unknown one."""
        if not internal_issued_state:
            raise ConfigurationError("the internal issued state must be a non-empty state name")
        self.store = store
        self.cas = dict(cas)
        self.graphs = dict(graphs)
        self._graph_of_template = graph_of_template
        self.issued_state = internal_issued_state
        # Certificates whose handling runs right now (registered before its intent is written,
        # removed after its moves): the reconciler leaves their intents alone (C16).
        self.running: set[str] = set()

    # -- helpers -------------------------------------------------------------------------

    def _graph(self, record: CertificateRecord) -> StateGraph:
        try:
            graph = self._graph_of_template(record.template)
        except KeyError:
            raise TemplateNotFound(f"certificate {record.id}: no certificate template {record.template!r}",
                                   certificate_id=record.id, template=record.template) from None
        if isinstance(graph, str):
            if graph not in self.graphs:
                raise ConfigurationError(f"certificate template {record.template!r} names the state graph "
                                         f"{graph!r}, which is not loaded", template=record.template)
            graph = self.graphs[graph]
        return graph

    def graph_of(self, record: CertificateRecord) -> StateGraph:
        """The state graph of the certificate's template."""
        return self._graph(record)

    def _ca(self, record: CertificateRecord) -> CaConnector:
        ca = self.cas.get(record.ca_name)
        if ca is None:
            raise ConfigurationError(f"certificate {record.id} was issued by the CA {record.ca_name!r}, which is "
                                     f"not configured (configured: {', '.join(sorted(self.cas)) or 'none'})",
                                     certificate_id=record.id, ca_name=record.ca_name)
        return ca

    def _require_move(self, graph: StateGraph, record_id: str, src: str, dst: str,
                      reason: str | None) -> None:
        """Validates src -> dst against the graph and the C14 rules; IllegalTransition if not."""
        issued = self.issued_state
        if dst == issued and src != issued:
            raise IllegalTransition(f"certificate {record_id}: nothing moves into the internal issued state "
                                    f"{issued!r}; certificates enter it only when received from the CA",
                                    certificate_id=record_id, from_state=src, to_state=dst, graph=graph.name)
        if src == issued and dst != graph.start:
            raise IllegalTransition(f"certificate {record_id}: the internal issued state {issued!r} can only be "
                                    f"left to the start state {graph.start!r} of state graph {graph.name!r}, "
                                    f"not to {dst!r}",
                                    certificate_id=record_id, from_state=src, to_state=dst, graph=graph.name)
        try:
            graph.require_move(src, dst, reason)
        except IllegalMove as exc:
            raise IllegalTransition(f"certificate {record_id}: {exc}", certificate_id=record_id, from_state=src,
                                    to_state=dst, graph=graph.name, **({"reason": reason} if reason else {})
                                    ) from None

    # -- change state (store only) ---------------------------------------------------------

    def change_state(self, certificate_id: str, to_state: str, reason: str | None = None,
                     actor: str | None = None) -> CertificateRecord:
        """Moves a certificate along its state graph in the store only (no CA involved).
        actor: who the audit names; by default the caller (docs/audit.md)."""
        actor = actor or current_actor()
        record = self.store.certificates.get(certificate_id)
        graph = self._graph(record)
        self._require_move(graph, record.id, record.state, to_state, reason)
        return self.store.certificates.change_state(
            record.id, to_state, from_state=record.state, actor=actor, action=AUDIT_CHANGE_STATE, reason=reason,
            detail={"graph": graph.name})

    # -- change state in CA (C17) --------------------------------------------------------

    def change_state_in_ca(self, certificate_id: str, to_state: str, reason: str | None = None,
                           actor: str | None = None) -> CertificateRecord:
        """C17: validates the move, maps the target state to a CA action (strict table,
        orchestrator/domain/ca_actions.py), asks the certificate's CA, then moves the store
        state. An illegal move or an unmapped state raises before the CA is asked; a CA
        failure leaves the store state as it was (and is audited)."""
        actor = actor or current_actor()
        record = self.store.certificates.get(certificate_id)
        graph = self._graph(record)
        self._require_move(graph, record.id, record.state, to_state, reason)
        action = ca_action_for(graph, record.state, to_state, reason)   # UnmappedCaAction: nothing sent
        ca = self._ca(record)
        detail = {"graph": graph.name, "ca": record.ca_name, "serial_hex": record.serial_hex, **action.to_dict()}
        failure = {**detail, "from": record.state, "to": to_state, "reason": reason}
        self.running.add(record.id)
        try:
            return self._change_in_ca_and_store(ca, record, action, to_state, reason, actor, detail, failure)
        finally:
            self.running.discard(record.id)

    def _change_in_ca_and_store(self, ca: CaConnector, record: CertificateRecord, action: CaAction, to_state: str,
                                reason: str | None, actor: str, detail: dict, failure: dict) -> CertificateRecord:
        try:
            record_intent(self.store, record, actor, detail["ca_action"], detail["ca_reason"],
                          [(record.state, to_state, reason)])
            self._apply(ca, record, action)
        except Exception as exc:
            self._audit_failure(AUDIT_CHANGE_STATE_IN_CA_FAILED, record.id, actor,
                                {**failure, "ca_done": False, "state": record.state, **_error_detail(exc)})
            raise
        try:
            return self.store.certificates.change_state(
                record.id, to_state, from_state=record.state, actor=actor, action=AUDIT_CHANGE_STATE_IN_CA,
                reason=reason, detail=detail)
        except Exception as exc:
            # The CA has acted but the store state changed under us (or the store failed):
            # say so, so that an operator can reconcile.
            self._audit_failure(AUDIT_CHANGE_STATE_IN_CA_FAILED, record.id, actor,
                                {**failure, "ca_done": True, **_error_detail(exc)})
            raise

    @staticmethod
    def _apply(ca: CaConnector, record: CertificateRecord, action: CaAction) -> None:
        if isinstance(action, LiftHold):
            ca.lift_hold(record.serial)
        else:
            ca.revoke(record.serial, action.reason)

    def _audit_failure(self, action: str, object_id: str, actor: str, detail: dict) -> None:
        try:
            self.store.audit.record(action, CERTIFICATE, object_id, actor, detail)
        except Exception:   # never hide the original error behind an audit failure
            log.exception("could not audit %s of certificate %s: %s", action, object_id, detail)

    # -- C5: handle certificates left in the internal issued state -----------------------------

    def handle_issued(self, certificate_ids: Iterable[str] | None, *, revoke_reason: str | None,
                      target_state: str | None, actor: str, only_finished_tasks: bool = True,
                      transition_reason: str | None = None) -> list[HandlingResult]:
        """C5, the `handle_issued` task: for each certificate still in the internal issued
        state (the ids given; None: every one), optionally revoke it at its CA with
        `revoke_reason`, then optionally move it Issued -> start state -> `target_state`.

        only_finished_tasks: leave certificates whose task is still RUNNING alone (their task
        may yet succeed and move them, C2).
        transition_reason: the reason for the move start -> target_state when that transition
        requires one; when None and `revoke_reason` is one of the transition's reasons, that
        is used.
        Each certificate is handled on its own: a failure is reported in its result and the
        others go on. Every revocation and move is audited (action "handle_issued").
        """
        if revoke_reason is None and target_state is None:
            raise InvalidArgument("handle_issued needs a revoke_reason, a target_state or both")
        if revoke_reason is not None:
            revocation_reason(revoke_reason)       # InvalidArgument for an unknown name
            if revoke_reason == REMOVE_FROM_CRL:
                raise InvalidArgument("removeFromCRL lifts a hold; it is no revocation reason for handle_issued",
                                      reason_name=revoke_reason)
        if target_state is not None and target_state == self.issued_state:
            raise InvalidArgument(f"target_state {quoted(target_state)} is the internal issued state")
        if certificate_ids is None:
            records: list[CertificateRecord | str] = list(self.store.certificates.list(state=self.issued_state))
        else:
            records = list(dict.fromkeys(certificate_ids))   # each once, in the order given
        results = []
        for item in records:
            cert_id = item if isinstance(item, str) else item.id
            self.running.add(cert_id)
            try:
                results.append(self._handle_one(item, revoke_reason, target_state, actor, only_finished_tasks,
                                                transition_reason))
            finally:
                self.running.discard(cert_id)
        return results

    def _handle_one(self, item: CertificateRecord | str, revoke_reason: str | None, target_state: str | None,
                    actor: str, only_finished_tasks: bool, transition_reason: str | None) -> HandlingResult:
        cert_id = item if isinstance(item, str) else item.id
        try:
            record = self.store.certificates.get(cert_id)    # fresh: the state may have moved since listed
        except NotFound as exc:
            return HandlingResult(cert_id, None, False, None, error=_error_text(exc))
        revoked = False
        state = record.state

        def result(**kw) -> HandlingResult:
            return HandlingResult(record.id, record.serial_hex, revoked, state, **kw)

        if record.state != self.issued_state:
            return result(skipped=f"not in the internal issued state {self.issued_state!r} "
                                  f"(state {record.state!r})")
        if only_finished_tasks and record.task_id is not None:
            try:
                task = self.store.tasks.get(record.task_id)
            except NotFound as exc:
                return result(error=_error_text(exc))
            if task.state == TaskState.RUNNING:
                return result(skipped=f"its task {task.id} is still running")

        base = {"task_id": record.task_id, "ca": record.ca_name, "serial_hex": record.serial_hex}
        step = "validate"
        try:
            moves: list[tuple[str, str, str | None]] = []
            if target_state is not None:
                graph = self._graph(record)
                moves.append((self.issued_state, graph.start, None))
                if target_state != graph.start:
                    t = graph.transition(graph.start, target_state)
                    reason = transition_reason
                    if reason is None and t is not None and revoke_reason in t.reasons:
                        reason = revoke_reason
                    moves.append((graph.start, target_state, reason))
                # Validate the whole way before anything happens to this certificate.
                for src, dst, reason in moves:
                    self._require_move(graph, record.id, src, dst, reason)
                base["graph"] = graph.name
            ca = self._ca(record) if revoke_reason is not None else None

            if ca is not None and revoke_reason is not None:
                step = "revoke"
                record_intent(self.store, record, actor, "revoke", revoke_reason, moves)
                ca.revoke(record.serial, revoke_reason)
                revoked = True
                self.store.audit.record(AUDIT_HANDLE_ISSUED, CERTIFICATE, record.id, actor,
                                        {**base, "step": "revoke", "ca_action": "revoke",
                                         "ca_reason": revoke_reason})
            if moves:
                # The whole way in one transaction: never left in the start state after the CA
                # revoked it (a revoked certificate that was never written must not look Active).
                step = "move " + " -> ".join([moves[0][0], *(dst for _, dst, _ in moves)])
                moved = self.store.certificates.change_states(
                    record.id, moves, actor=actor, action=AUDIT_HANDLE_ISSUED,
                    detail={**base, "step": "move", "revoked": revoked,
                            **({"revoke_reason": revoke_reason} if revoked else {})})
                state = moved.state
        except Exception as exc:
            if not isinstance(exc, CardlineError):
                log.exception("handle_issued: certificate %s failed at %s", record.id, step)
            if step != "validate":
                self._audit_failure(AUDIT_HANDLE_ISSUED_FAILED, record.id, actor,
                                    {**base, "step": step, "revoked": revoked, "state": state,
                                     **_error_detail(exc)})
            return result(error=_error_text(exc))
        return result()

    # -- C4: search ----------------------------------------------------------------------

    def search_issued(self, older_than: dt.timedelta | None = None, template: str | None = None,
                      card_id: str | None = None, gateway_id: str | None = None, reader_id: str | None = None,
                      task_id: str | None = None, limit: int | None = None, *,
                      process_instance_id: str | None = None, now: dt.datetime | None = None) -> list[IssuedHit]:
        """C4: certificates in the internal issued state, oldest first. older_than: received
        from the CA more than this long before `now` (default: the current time). All
        filters combine with AND."""
        issued_before = None
        if older_than is not None:
            if older_than < dt.timedelta(0):
                raise InvalidArgument(f"older_than must not be negative, got {older_than}")
            now = now or dt.datetime.now(dt.UTC)
            if now.tzinfo is None:
                raise InvalidArgument("now must be timezone-aware")
            issued_before = now - older_than
        if limit is not None and limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {limit}")
        records = self.store.certificates.list(state=self.issued_state, template=template, card_id=card_id,
                                               task_id=task_id, issued_before=issued_before, limit=limit,
                                               gateway_id=gateway_id, reader_id=reader_id,
                                               **({"process_instance_id": process_instance_id}
                                                  if process_instance_id is not None else {}))
        return [IssuedHit(descriptor=CoreObjectDescriptor(CERTIFICATE, r.template, r.id), serial_hex=r.serial_hex,
                          issuer=r.issuer, subject=r.subject, ca_name=r.ca_name, created_at=r.created_at,
                          task_id=r.task_id, task_error_reason=r.task_error_reason,
                          task_error_message=r.task_error_message)
                for r in records]
