"""`cardline audit list` and `cardline audit verify` (AuditService, docs/audit.md): the audit
trail for auditors, and its hash chain checked - through the orchestrator, or with
`--database-url` straight on a database (a copy kept for an audit, no orchestrator needed)."""
from __future__ import annotations

import datetime as dt

import typer
from google.protobuf import timestamp_pb2
from rich.console import Console

from orchestrator.cli.client import JSON, ORCHESTRATOR, all_pages, as_json, print_json, print_table, stub, when
from shared.cli import CliFail
from shared.proto import audit_service_pb2 as pb
from shared.proto import audit_service_pb2_grpc

EXPECT_HEAD = typer.Option("", "--expect-head", help="A head hash noted from an earlier verify: also finds the "
                                                     "newest rows deleted.")


def register(root: typer.Typer) -> None:
    audit = typer.Typer(help="The audit trail: who did what, where; hash-chained (docs/audit.md).")

    @audit.command("list")
    def audit_list(
        object_id: str = typer.Option("", "--object-id", help="Only events about this object."),
        action: str = typer.Option("", "--action", help="Only this action (e.g. task_finished, change_state)."),
        actor: str = typer.Option("", "--actor", help="Only this actor (role:name#serial)."),
        since: str = typer.Option("", "--since", help="Only events at or after this ISO 8601 time."),
        until: str = typer.Option("", "--until", help="Only events before this ISO 8601 time."),
        card_id: str = typer.Option("", "--card-id", help="Only events about this card."),
        certificate_id: str = typer.Option("", "--certificate-id", help="Only events naming this certificate."),
        task_id: str = typer.Option("", "--task-id", help="Only events of this task."),
        limit: int = typer.Option(0, "--limit", help="At most N events (0: all)."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Audit events, oldest first, filtered."""
        request = pb.ListAuditEventsRequest(object_id=object_id, action=action, actor=actor, card_id=card_id,
                                            certificate_id=certificate_id, task_id=task_id)
        for field, text in (("since", since), ("until", until)):
            if text:
                getattr(request, field).CopyFrom(_timestamp(text, f"--{field}"))
        events = all_pages(stub(audit_service_pb2_grpc.AuditServiceStub, orchestrator_addr).ListAuditEvents,
                           request, "events", limit)
        if json_output:
            print_json([as_json(e) for e in events])
            return
        print_table("id", "at", "actor", "action", "object", "card", "task", "gateway/reader", "certificates",
                    rows=[(str(e.id), when(e.at), e.actor, e.action, f"{e.object_type} {e.object_id}", e.card_id,
                           e.task_id + (f" step {e.step}" if e.step else ""),
                           f"{e.gateway_id}/{e.reader_id}" if e.gateway_id else "",
                           " ".join(f"{c.ca}:{c.serial_hex}" for c in e.certificates)) for e in events])

    @audit.command("verify")
    def audit_verify(expect_head: str = EXPECT_HEAD,
                     database_url: str = typer.Option("", "--database-url", help="Verify this database directly "
                                                       "(SQLAlchemy URL) instead of asking the orchestrator."),
                     json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Check the hash chain: exit 0 with a summary when intact; exit 1 naming the first bad
        row and what is wrong (edited, deleted, inserted, reordered)."""
        report = _verify_database(database_url, expect_head) if database_url else \
            stub(audit_service_pb2_grpc.AuditServiceStub, orchestrator_addr).VerifyAudit(
                pb.VerifyAuditRequest(expected_head=expect_head))
        if json_output:
            print_json(as_json(report))
        elif report.intact:
            Console(highlight=False, soft_wrap=True).print(
                f"audit trail intact: {report.rows} rows, head {report.head}", markup=False)
        if not report.intact:
            first = report.problems[0]
            more = f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else ""
            raise CliFail(f"audit trail broken at row {first.row_id}: {first.message}{more}")

    root.add_typer(audit, name="audit")


def _timestamp(text: str, option: str) -> timestamp_pb2.Timestamp:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CliFail(f"{option}: {text!r} is not an ISO 8601 time (e.g. 2026-11-29T15:00:00Z)", 2) from None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return ts


def _verify_database(database_url: str, expect_head: str) -> pb.VerifyAuditResponse:
    from orchestrator.api.audit import verify_response
    from orchestrator.store.store import Store

    store = Store(database_url)
    try:
        return verify_response(store.audit.verify(expect_head or None))
    finally:
        store.close()
