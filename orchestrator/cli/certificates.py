"""`cardline certs ...` (CertificateService)."""
from __future__ import annotations

import datetime as dt

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.cli.client import ORCHESTRATOR, as_json, print_json, stub
from shared.cli import CliFail
from shared.proto import certificate_service_pb2 as pb
from shared.proto import certificate_service_pb2_grpc

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> dt.timedelta:
    """30s, 15m, 2h, 7d."""
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise CliFail(f"duration {text!r}: expected a number and s, m, h or d (e.g. 15m)", 2)
    return dt.timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])


def _certificates(target: str) -> certificate_service_pb2_grpc.CertificateServiceStub:
    return stub(certificate_service_pb2_grpc.CertificateServiceStub, target)


def register(root: typer.Typer) -> None:
    certs = typer.Typer(help="Certificates in the store.", no_args_is_help=True)

    @certs.command("list")
    def certs_list(
        state: str = typer.Option("", help="Only certificates in this state (e.g. Issued)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        task: str = typer.Option("", help="Only certificates of this task."),
        limit: int = typer.Option(0, help="At most this many (0: all)."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """List certificates."""
        found = _certificates(orchestrator_addr).ListCertificates(pb.ListCertificatesRequest(
            state=state, template=template, card_id=card, task_id=task, limit=limit)).certificates
        if json_output:
            print_json([{k: v for k, v in as_json(c).items() if k != "der"} for c in found])
            return
        table = Table("id", "serial", "subject", "template", "state", "task error")
        for c in found:
            table.add_row(c.id, c.serial_hex, c.subject, c.template, c.state, c.task_error)
        Console().print(table)

    @certs.command("expiring")
    def certs_expiring(
        days: int = typer.Option(..., "--days", min=1, help="Expiring within this many days from now."),
        state: str = typer.Option("", help="Only certificates in this state (e.g. Active)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Certificates whose notAfter falls within the next N days (every page)."""
        service = _certificates(orchestrator_addr)
        found: list[pb.Certificate] = []
        token = ""
        while True:
            page = service.ListExpiringCertificates(pb.ListExpiringCertificatesRequest(
                days=days, state=state, template=template, card_id=card, page_token=token))
            found += page.certificates
            token = page.next_page_token
            if not token:
                break
        if json_output:
            print_json([{k: v for k, v in as_json(c).items() if k != "der"} for c in found])
            return
        table = Table("id", "serial", "subject", "template", "state", "card", "not after")
        for c in found:
            table.add_row(c.id, c.serial_hex, c.subject, c.template, c.state, c.card_id or "-",
                          c.not_after.ToDatetime().isoformat(timespec="seconds"))
        Console().print(table)

    @certs.command("issued")
    def certs_issued(
        older_than: str = typer.Option("", help="Only those stored longer ago than this (30s, 15m, 2h, 7d)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        gateway: str = typer.Option("", help="Only certificates made through this gateway."),
        reader: str = typer.Option("", help="Only certificates made on this reader."),
        task: str = typer.Option("", help="Only certificates of this task."),
        limit: int = typer.Option(0, help="At most this many (0: all)."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Certificates left in the internal issued state by failed tasks (rule C4)."""
        request = pb.SearchIssuedCertificatesRequest(template=template, card_id=card, gateway_id=gateway,
                                                     reader_id=reader, task_id=task, limit=limit)
        if older_than:
            request.older_than.FromTimedelta(duration(older_than))
        hits = _certificates(orchestrator_addr).SearchIssuedCertificates(request).certificates
        if json_output:
            print_json([as_json(h) for h in hits])
            return
        table = Table("id", "template", "serial", "issuer", "stored", "task", "task error")
        for h in hits:
            table.add_row(h.descriptor.id, h.descriptor.template, h.serial_hex, h.issuer,
                          h.created_at.ToDatetime().isoformat(timespec="seconds"), h.task_id,
                          f"{h.task_error.reason}: {h.task_error.message}" if h.task_error.reason else "")
        Console().print(table)

    @certs.command("handle-issued")
    def certs_handle_issued(
        certificate_ids: list[str] = typer.Argument(None, help="Certificates to handle (default: every one "
                                                                "in the internal issued state)."),
        revoke_reason: str = typer.Option("", help="Revoke at the CA with this RFC 5280 reason."),
        target_state: str = typer.Option("", help="Move them to this state of their graph."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Handle certificates left in the internal issued state (rule C5), audited."""
        results = _certificates(orchestrator_addr).HandleIssuedCertificates(pb.HandleIssuedCertificatesRequest(
            certificate_ids=certificate_ids or [], revoke_reason=revoke_reason, target_state=target_state)).results
        if json_output:
            print_json([as_json(r) for r in results])
            return
        for r in results:
            outcome = (f"error {r.error.reason}: {r.error.message}" if r.error.reason else
                       f"skipped: {r.skipped}" if r.skipped else f"{'revoked, ' if r.revoked else ''}{r.state}")
            Console().print(f"{r.certificate_id} {r.serial_hex}: {outcome}")

    @certs.command("change-state")
    def certs_change_state(
        certificate_id: str, state: str,
        reason: str = typer.Option("", help="Reason of the transition."),
        in_ca: bool = typer.Option(False, "--in-ca", help="Through the CA (revoke, hold, lift a hold: rule C17)."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Move a certificate along its state graph."""
        cert = _certificates(orchestrator_addr).ChangeCertificateState(pb.ChangeCertificateStateRequest(
            certificate_id=certificate_id, state=state, reason=reason, in_ca=in_ca)).certificate
        Console().print(f"certificate {cert.id} {cert.serial_hex} is {cert.state}")

    root.add_typer(certs, name="certs")
