"""Card production: key pairs generated on the card, requests signed by the card keys, the
CA's certificates committed in the internal issued state before they are written (C1),
moved to their start state with the card's relations when everything succeeded (C2), left
in the internal issued state when it did not (C3)."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from orchestrator.ca.base import CaConnector, IssueProfile
from orchestrator.domain.templates import DEFAULT_RELATION_TYPE, CertificateTemplate, Templates
from orchestrator.services.pool import Lease, ReaderPool, ReaderSelector
from orchestrator.store.records import TaskRecord
from orchestrator.store.store import Store
from shared import cards
from shared.errors import CardlineError, CsrInvalid, InvalidArgument
from shared.logging import get_logger

log = get_logger(__name__)

# Named points between the steps of a production; tests and fault injection hook in here.
BOUNDARIES = ("before_issue", "after_issue", "after_store", "after_write", "before_finish")
BoundaryHook = Callable[[str, str], Awaitable[None]]   # (boundary, task_id)


@dataclass(frozen=True)
class CertificateOrder:
    template: str
    key_type: cards.KeyType | None = None   # None: the template's key type
    key_label: str = ""


@dataclass(frozen=True)
class ProductionOrder:
    selector: ReaderSelector
    subject: str
    certificates: tuple[CertificateOrder, ...]
    user_pin: str
    card_template: str = "EmployeeCard"

    def __repr__(self) -> str:  # the PIN never reaches a log line
        return f"ProductionOrder({self.selector}, {self.subject!r}, {self.certificates}, card={self.card_template!r})"


@dataclass(frozen=True)
class Progress:
    task_id: str
    step_number: int
    message: str
    task: TaskRecord | None = None


ProgressSink = Callable[[Progress], None]


class ProductionService:
    def __init__(self, store: Store, pool: ReaderPool, cas: dict[str, CaConnector], templates: Templates, *,
                 step_timeout_s: float = 120.0, relation_type: str = DEFAULT_RELATION_TYPE,
                 boundary: BoundaryHook | None = None) -> None:
        self.store = store
        self.pool = pool
        self.cas = cas
        self.templates = templates
        self.step_timeout_s = step_timeout_s
        self.relation_type = relation_type
        self.boundary = boundary

    def validate(self, order: ProductionOrder) -> list[tuple[CertificateOrder, CertificateTemplate]]:
        """Everything that can be checked before a card is touched."""
        if not order.certificates:
            raise InvalidArgument("the order asks for no certificate", field="certificates")
        try:
            x509.Name.from_rfc4514_string(order.subject)
        except ValueError as exc:
            raise InvalidArgument(f"subject {order.subject!r} is not an RFC 4514 name: {exc}", field="subject") from None
        self.templates.card(order.card_template)
        planned = []
        for i, wanted in enumerate(order.certificates):
            template = self.templates.certificate(wanted.template)
            if template.ca not in self.cas:
                raise InvalidArgument(f"certificates[{i}]: template {template.name!r} names unknown CA {template.ca!r}",
                                      field=f"certificates[{i}].template")
            planned.append((wanted, template))
        return planned

    async def produce(self, order: ProductionOrder, progress: ProgressSink = lambda p: None) -> TaskRecord:
        planned = self.validate(order)
        async with self.pool.lease(order.selector) as lease:
            task = await asyncio.to_thread(self.store.create_task, "card_production", lease.gateway_id,
                                           lease.reader.reader_id)
            run = _ProductionRun(self, task.id, lease, order, progress)
            return await run.execute(planned)


class _ProductionRun:
    """One production task: its step counter, the certificates it has stored so far."""

    def __init__(self, service: ProductionService, task_id: str, lease: Lease, order: ProductionOrder,
                 progress: ProgressSink) -> None:
        self.s = service
        self.task_id = task_id
        self.lease = lease
        self.order = order
        self.progress = progress
        self.step_number = 0
        self.card_template = service.templates.card(order.card_template)

    async def _db(self, fn, *args, **kwargs):
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _boundary(self, name: str) -> None:
        if self.s.boundary is not None:
            await self.s.boundary(name, self.task_id)

    def _tell(self, message: str, task: TaskRecord | None = None) -> None:
        self.progress(Progress(self.task_id, self.step_number, message, task))

    async def _step(self, name: str, operation: cards.Operation) -> cards.StepValue:
        # Journaled before it is sent: after a crash the journal tells which step may have
        # run. Its completion needs no write of its own: the next journal entry, the stored
        # certificate or the task's end records it, and the gateway answers a resent
        # (task, step) from its first result.
        self.step_number += 1
        await self._db(self.s.store.journal_step, self.task_id, self.step_number, name, "sent")
        return await self.lease.run(cards.Step(operation, user_pin=self.order.user_pin), task_id=self.task_id,
                                    step_number=self.step_number, timeout_s=self.s.step_timeout_s)

    async def execute(self, planned: list[tuple[CertificateOrder, CertificateTemplate]]) -> TaskRecord:
        store = self.s.store
        issued: dict[str, CertificateTemplate] = {}
        card_id = None
        try:
            info = await self._step("read_card_info", cards.ReadCardInfo())
            assert isinstance(info, cards.Reader)
            card = await self._db(store.create_card, self.task_id, info.token_serial or info.atr.hex(),
                                  self.card_template.name, self.card_template.initial_state,
                                  self.lease.gateway_id, self.lease.reader.reader_id)
            card_id = card.id
            self._tell(f"card {card.serial} ({info.token_label or info.name}) in production")
            for index, (wanted, template) in enumerate(planned):
                cert_id = await self._produce_certificate(index, wanted, template)
                issued[cert_id] = template
            await self._boundary("before_finish")
            # C2: one transaction moves every certificate to its start state with the relations.
            states = {cid: t.start_state for cid, t in issued.items()}
            relations = [("Card", card_id, "Certificate", cid, self.s.relation_type) for cid in issued]
            internal = {t.internal_issued_state for t in issued.values()}
            await self._db(store.finish_task_succeeded, self.task_id, internal.pop() if len(internal) == 1 else None,
                           states, self.card_template.produced_state, relations)
        except CardlineError as exc:
            log.info("production failed", task_id=self.task_id, reason=exc.reason, error=exc.message)
            # C3: certificates stay in the internal issued state, carrying the task's error.
            await self._db(store.finish_task_failed, self.task_id, exc.reason, exc.message,
                           self.card_template.failed_state if card_id else None)
        task = await self._db(store.get_task, self.task_id)
        self._tell("card produced" if task.state == "SUCCEEDED" else f"production failed: {task.error_message}", task)
        return task

    async def _produce_certificate(self, index: int, wanted: CertificateOrder, template: CertificateTemplate) -> str:
        key_type = wanted.key_type or template.key_type
        label = wanted.key_label or template.name
        key_id = os.urandom(16)
        generated = await self._step(f"generate_key_pair:{label}", cards.GenerateKeyPair(
            key_type, label, key_id, csr_subject=self.order.subject))
        assert isinstance(generated, cards.GeneratedKey)
        _check_proof_of_possession(generated)
        self._tell(f"key pair {key_type.value} generated on the card ({label})")

        await self._boundary("before_issue")
        ca = self.s.cas[template.ca]
        profile = IssueProfile(validity_days=template.validity_days, key_usage=set(template.key_usage),
                               extended_key_usage=list(template.extended_key_usage))
        request_id = f"{self.task_id}:{self.step_number}:{index}"
        der = await asyncio.to_thread(ca.issue, generated.csr_der, profile, request_id)
        await self._boundary("after_issue")
        # C1: committed in the internal issued state before the card is asked to store it.
        record = await self._db(self.s.store.store_issued_certificate, self.task_id, der, template.name, ca.name,
                                template.internal_issued_state)
        self._tell(f"certificate {record.serial_hex} issued by {ca.name}, stored as {record.state}")
        await self._boundary("after_store")

        await self._step(f"write_certificate:{label}", cards.WriteCertificates(
            (cards.CertificateObject(key_id, label, der),)))
        self._tell(f"certificate {record.serial_hex} written next to its key ({label})")
        await self._boundary("after_write")
        return record.id


def _check_proof_of_possession(generated: cards.GeneratedKey) -> None:
    """The request must be signed by the key the card just generated."""
    try:
        csr = x509.load_der_x509_csr(generated.csr_der)
    except ValueError as exc:
        raise CsrInvalid(f"the card returned no valid certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrInvalid("the certificate request's signature does not verify")
    spki = csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki != generated.public_key_der:
        raise CsrInvalid("the certificate request carries another key than the one generated on the card")
