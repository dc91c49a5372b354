"""Certificates: the C4 search, state changes with their audit event (C5), archived keys (C7).
Storing a newly issued certificate is a rule transaction of the Store itself (C1, C16)."""
from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from cryptography import x509
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError

from orchestrator.store import paging
from orchestrator.store.models import ArchivedKey, Certificate, ObjectRelation, Task, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.records import CARD, CERTIFICATE, ArchivedKeyRecord, CertificateRecord, WrappedKey
from orchestrator.store.rows import certificate_row, change_state, check_wrapped_key, record
from orchestrator.store.sessions import Sessions
from shared.errors import AlreadyExists, InvalidArgument, NotFound, quoted


def parse_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise InvalidArgument(f"not a DER X.509 certificate: {exc}") from None


class Certificates:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def get(self, certificate_id: str) -> CertificateRecord:
        with self._db.read() as s:
            return record(CertificateRecord, certificate_row(s, certificate_id))

    def known(self, der: bytes) -> bool:
        """Whether a certificate with this one's issuer and serial is stored (C16)."""
        cert = parse_certificate(der)
        with self._db.read() as s:
            return s.scalar(select(Certificate.id).where(
                Certificate.issuer == cert.issuer.rfc4514_string(),
                Certificate.serial_hex == format(cert.serial_number, "x"))) is not None

    def ids_by_task(self, task_ids: Collection[str]) -> dict[str, list[str]]:
        """The ids of the certificates of many tasks in one query (a page of a listing):
        task id -> certificate ids, oldest first (as list(task_id=...)); [] for none."""
        out: dict[str, list[str]] = {task_id: [] for task_id in task_ids}
        if not out:
            return out
        q = (select(Certificate.task_id, Certificate.id).where(Certificate.task_id.in_(out))
             .order_by(Certificate.created_at, Certificate.id))
        with self._db.read() as s:
            for task_id, certificate_id in s.execute(q):
                if task_id is not None:          # always: filtered on the task ids
                    out[task_id].append(certificate_id)
        return out

    def list(self, state: str | None = None, template: str | None = None,
             card_id: str | None = None, task_id: str | None = None,
             issued_before: dt.datetime | None = None, limit: int | None = None,
             gateway_id: str | None = None, reader_id: str | None = None,
             process_instance_id: str | None = None, expiring_before: dt.datetime | None = None,
             valid_at: dt.datetime | None = None, serial_hex: str | None = None,
             after: Keyset | None = None) -> list[CertificateRecord]:
        """C4 search, oldest first (created_at, then id). All filters combine with AND.

        issued_before: stored (received from the CA) strictly before this aware datetime.
        card_id: related to the card (Card -> Certificate relation) OR issued by a task of
          that card - so certificates of a failed production, which has no relation under
          CreateObjectRelation=success, are found by their card too.
        gateway_id / reader_id: of the task that issued the certificate.
        process_instance_id: issued by a task of that process instance.
        expiring_before / valid_at: notAfter strictly before / notAfter at or after these aware
          datetimes ("expiring within N days": valid_at=now, expiring_before=now + N days).
        serial_hex: the serial as stored (lower-case hex, no leading zeros).
        after: the (created_at, id) of the last certificate of the previous page.
        """
        q = select(Certificate)
        if serial_hex is not None:
            q = q.where(Certificate.serial_hex == serial_hex)
        if state is not None:
            q = q.where(Certificate.state == state)
        if template is not None:
            q = q.where(Certificate.template == template)
        if task_id is not None:
            q = q.where(Certificate.task_id == task_id)
        if issued_before is not None:
            if issued_before.tzinfo is None:
                raise InvalidArgument("issued_before must be timezone-aware")
            q = q.where(Certificate.created_at < issued_before)
        for name, moment in (("expiring_before", expiring_before), ("valid_at", valid_at)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidArgument(f"{name} must be timezone-aware")
        if expiring_before is not None:
            q = q.where(Certificate.not_after < expiring_before)
        if valid_at is not None:
            q = q.where(Certificate.not_after >= valid_at)
        if gateway_id is not None or reader_id is not None:
            q = q.join(Task, Certificate.task_id == Task.id)
            if gateway_id is not None:
                q = q.where(Task.gateway_id == gateway_id)
            if reader_id is not None:
                q = q.where(Task.reader_id == reader_id)
        if process_instance_id is not None:
            q = q.where(Certificate.task_id.in_(
                select(Task.id).where(Task.process_instance_id == process_instance_id)))
        if card_id is not None:
            related = select(ObjectRelation.target_id).where(
                ObjectRelation.source_type == CARD, ObjectRelation.source_id == card_id,
                ObjectRelation.target_type == CERTIFICATE)
            of_card_tasks = select(Task.id).where(Task.card_id == card_id)
            q = q.where(or_(Certificate.id.in_(related), Certificate.task_id.in_(of_card_tasks)))
        q = paging.after(q, Certificate.created_at, Certificate.id, after)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [record(CertificateRecord, c) for c in s.scalars(q)]

    def census(self, internal_states: Collection[str]) -> tuple[dict[str, int], dt.datetime | None]:
        """For the metrics: how many certificates are in each state, and when the oldest one
        in one of `internal_states` was stored (None: there is none). Two aggregate queries
        on the (state, created_at) index, whatever the number of certificates."""
        with self._db.read() as s:
            counts = {state: int(n) for state, n in
                      s.execute(select(Certificate.state, func.count()).group_by(Certificate.state))}
            oldest = s.scalar(select(func.min(Certificate.created_at))
                              .where(Certificate.state.in_(list(internal_states))))
        return counts, oldest

    def change_state(self, certificate_id: str, to_state: str, *, from_state: str | None,
                     actor: str, action: str, reason: str | None = None,
                     detail: Mapping[str, Any] | None = None) -> CertificateRecord:
        """C5/C17: sets the certificate's state and writes the audit event of `action` in ONE
        transaction. The row is locked (FOR UPDATE on PostgreSQL; SQLite writers are serial),
        so two changes of one certificate cannot both pass the from_state check. from_state:
        the state the caller validated the transition from; StateConflict naming both states
        (and nothing written) if the certificate is elsewhere; None skips the check. The
        store knows no state graphs: callers validate the transition. The audit detail is
        `detail` plus {"from", "to", "reason"}."""
        with self._db.write() as s:
            cert = certificate_row(s, certificate_id, lock=True)
            change_state(s, cert, CERTIFICATE, to_state, from_state, actor, action, reason, detail)
            return record(CertificateRecord, cert)

    def change_states(self, certificate_id: str, moves: Sequence[tuple[str, str, str | None]], *, actor: str,
                      action: str, detail: Mapping[str, Any] | None = None) -> CertificateRecord:
        """Several moves of one certificate, (from, to, reason) in order, each with its audit
        event, all in ONE transaction: a path such as internal issued -> start -> target (C5)
        is taken whole or not at all, so an interruption never leaves the certificate
        half-way (in its start state, say, after its CA revoked it). StateConflict (and
        nothing written) if the certificate is not in the first move's from-state."""
        if not moves:
            raise InvalidArgument(f"certificate {certificate_id}: no move given")
        with self._db.write() as s:
            cert = certificate_row(s, certificate_id, lock=True)
            for from_state, to_state, reason in moves:
                change_state(s, cert, CERTIFICATE, to_state, from_state, actor, action, reason, detail)
            return record(CertificateRecord, cert)


class ArchivedKeys:
    """The wrapped private keys of certificates (C7); the store never sees a plain key."""

    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def add(self, certificate_id: str, key: WrappedKey) -> ArchivedKeyRecord:
        """Stores the wrapped private key of a stored certificate; AlreadyExists if it has one."""
        check_wrapped_key(key)
        with self._db.write() as s:
            certificate_row(s, certificate_id)
            if s.get(ArchivedKey, certificate_id) is not None:
                raise AlreadyExists(f"certificate {certificate_id} already has an archived key",
                                    certificate_id=certificate_id)
            row = ArchivedKey(certificate_id=certificate_id, kek_id=key.kek_id, algorithm=key.algorithm,
                              wrapped_key=bytes(key.wrapped_key), created_at=utcnow())
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # a concurrent writer archived it first
                raise AlreadyExists(f"certificate {certificate_id} already has an archived key",
                                    certificate_id=certificate_id) from None
            return record(ArchivedKeyRecord, row)

    def get(self, certificate_id: str) -> ArchivedKeyRecord:
        with self._db.read() as s:
            row = s.get(ArchivedKey, certificate_id)
            if row is None:
                raise NotFound(f"no archived key for certificate {quoted(certificate_id)}",
                               certificate_id=certificate_id)
            return record(ArchivedKeyRecord, row)
