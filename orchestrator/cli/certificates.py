"""`cardline certs ...` (CertificateService)."""
from __future__ import annotations

import datetime as dt

import typer
from rich.console import Console

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    all_pages,
    as_json,
    confirm,
    console,
    print_json,
    print_table,
    stub,
    when,
)
from shared.cli import CliFail
from shared.errors import InvalidArgument, quoted
from shared.limits import MAX_DURATION, MAX_ITEMS, check_duration
from shared.proto import certificate_service_pb2 as pb
from shared.proto import certificate_service_pb2_grpc
from shared.serials import show_serial

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CARD_ID = typer.Option("", "--card-id", "--card", help="Only certificates of this card (--card: old name).")
TASK_ID = typer.Option("", "--task-id", "--task", help="Only certificates of this task (--task: old name).")
TEMPLATE = typer.Option("", "--template", help="Only this certificate template.")
LIMIT = typer.Option(0, "--limit", help="At most this many (0: all).")


def duration(text: str) -> dt.timedelta:
    """30s, 15m, 2h, 7d."""
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise CliFail(f"duration {quoted(text)}: expected a number and s, m, h or d (e.g. 15m)", 2)
    if len(text) > 20:          # int() of thousands of digits is slow, and far past the limit anyway
        raise CliFail(f"duration {quoted(text)}: longer than the limit of {MAX_DURATION.days} days", 2)
    try:
        return check_duration(int(text[:-1]) * _UNITS[text[-1]], "--older-than")
    except InvalidArgument as exc:
        raise CliFail(f"duration {quoted(text)}: {exc.message}", 2) from None


def _certificates(target: list[str]) -> certificate_service_pb2_grpc.CertificateServiceStub:
    return stub(certificate_service_pb2_grpc.CertificateServiceStub, target)


def _is_uuid(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


def register(root: typer.Typer) -> None:
    certs = typer.Typer(help="Certificates in the store.", no_args_is_help=True)

    @certs.command("list")
    def certs_list(
        state: str = typer.Option("", help="Only certificates in this state (e.g. Issued)."),
        template: str = TEMPLATE, card_id: str = CARD_ID, task_id: str = TASK_ID,
        serial: str = typer.Option("", help="Only this serial number (0D:B6:..., or hex without colons)."),
        limit: int = LIMIT, json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """List certificates, oldest first (paged through the API)."""
        found = all_pages(_certificates(orchestrator_addr).ListCertificates, pb.ListCertificatesRequest(
            state=state, template=template, card_id=card_id, task_id=task_id, serial=serial), "certificates", limit)
        if json_output:
            print_json([{k: v for k, v in as_json(c).items() if k != "der"} for c in found])
            return
        print_table("id", "serial", "subject", "template", "state", "card", "task error",
                    rows=[(c.id, show_serial(c.serial_hex), c.subject, c.template, c.state, c.card_id,
                           c.task_error) for c in found])

    @certs.command("show")
    def certs_show(
        certificate: str = typer.Argument(..., help="The certificate's id, or its serial number (0D:B6:... as "
                                                    "openssl shows it, or hex without colons)."),
        issuer: str = typer.Option("", help="Its issuer (RFC 4514), when two CAs issued that serial."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """One certificate: serial, subject, issuer, validity, state, card, task."""
        request = (pb.GetCertificateRequest(certificate_id=certificate) if _is_uuid(certificate)
                   else pb.GetCertificateRequest(serial=certificate, issuer=issuer))
        c = _certificates(orchestrator_addr).GetCertificate(request).certificate
        if json_output:
            print_json(as_json(c))
            return
        Console(soft_wrap=True).print(
            f"certificate {c.id}\n  serial     {show_serial(c.serial_hex)}\n  subject    {c.subject}\n"
            f"  issuer     {c.issuer}\n  valid      {when(c.not_before)} to {when(c.not_after)}\n"
            f"  template   {c.template}\n  state      {c.state}\n  card       {c.card_id or '-'}\n"
            f"  task       {c.task_id or '-'}\n  stored     {when(c.created_at)}"
            + (f"\n  task error {c.task_error}" if c.task_error else ""), highlight=False, markup=False)

    @certs.command("expiring")
    def certs_expiring(
        days: int = typer.Option(..., "--days", min=1, help="Expiring within this many days from now."),
        state: str = typer.Option("", help="Only certificates in this state (e.g. Active)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
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
        print_table("id", "serial", "subject", "template", "state", "card", "not after",
                    rows=[(c.id, show_serial(c.serial_hex), c.subject, c.template, c.state, c.card_id or "-",
                           c.not_after.ToDatetime().isoformat(timespec="seconds")) for c in found])

    @certs.command("issued")
    def certs_issued(
        older_than: str = typer.Option("", help="Only those stored longer ago than this (30s, 15m, 2h, 7d)."),
        template: str = TEMPLATE, card_id: str = CARD_ID,
        gateway_id: str = typer.Option("", "--gateway-id", "--gateway",
                                       help="Only certificates made through this gateway (--gateway: old name)."),
        reader_id: str = typer.Option("", "--reader-id", "--reader",
                                      help="Only certificates made on this reader (--reader: old name)."),
        task_id: str = TASK_ID, limit: int = LIMIT, json_output: bool = JSON,
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Certificates left in the internal issued state by failed tasks (rule C4)."""
        hits = _search_issued(orchestrator_addr, older_than=older_than, template=template, card_id=card_id,
                              gateway_id=gateway_id, reader_id=reader_id, task_id=task_id, limit=limit)
        if json_output:
            print_json([as_json(h) for h in hits])
            return
        print_table("id", "template", "serial", "issuer", "stored", "task", "task error",
                    rows=[(h.descriptor.id, h.descriptor.template, show_serial(h.serial_hex), h.issuer,
                           when(h.created_at), h.task_id,
                           f"{h.task_error.reason}: {h.task_error.message}" if h.task_error.reason else "")
                          for h in hits])

    @certs.command("handle-issued")
    def certs_handle_issued(
        certificate_ids: list[str] = typer.Argument(None, help="Certificates to handle (default: every one "
                                                                "in the internal issued state, after a "
                                                                "confirmation)."),
        revoke_reason: str = typer.Option("", help="Revoke at the CA with this RFC 5280 reason."),
        target_state: str = typer.Option("", help="Move them to this state of their graph."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Only list the certificates that would be handled."),
        yes: bool = typer.Option(False, "--yes", "-y", help="Handle every issued certificate without asking."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Handle certificates left in the internal issued state (rule C5), audited."""
        ids = list(certificate_ids or [])
        certificates = _certificates(orchestrator_addr)
        if not ids or dry_run:
            hits = _search_issued(orchestrator_addr)
            chosen = [h for h in hits if not ids or h.descriptor.id in ids]
            if dry_run:
                if json_output:
                    print_json([as_json(h) for h in chosen])
                else:
                    for h in chosen:
                        print(f"would handle {h.descriptor.id} {show_serial(h.serial_hex)} {h.descriptor.template}")
                    console.print(f"dry run: {len(chosen)} certificate(s) would be handled; nothing was done")
                return
            if not chosen:
                console.print("no certificate is in the internal issued state; nothing to do")
                if json_output:
                    print_json([])
                return
            what = (f"revoke ({revoke_reason}) " if revoke_reason else "") + (
                f"move to {target_state} " if target_state else "")
            confirm(f"{what or 'handle '}{len(chosen)} certificate(s) in the internal issued state?", yes)
            ids = [h.descriptor.id for h in chosen]   # exactly those confirmed, not ones stored since
        results = [r for start in range(0, len(ids), MAX_ITEMS)     # a request names at most MAX_ITEMS
                   for r in certificates.HandleIssuedCertificates(pb.HandleIssuedCertificatesRequest(
                       certificate_ids=ids[start:start + MAX_ITEMS], revoke_reason=revoke_reason,
                       target_state=target_state)).results]
        if json_output:
            print_json([as_json(r) for r in results])
            return
        for r in results:
            outcome = (f"error {r.error.reason}: {r.error.message}" if r.error.reason else
                       f"skipped: {r.skipped}" if r.skipped else f"{'revoked, ' if r.revoked else ''}{r.state}")
            Console(soft_wrap=True).print(f"{r.certificate_id} {show_serial(r.serial_hex)}: {outcome}",
                                          highlight=False, markup=False)

    @certs.command("change-state")
    def certs_change_state(
        certificate_id: str, state: str,
        reason: str = typer.Option("", help="Reason of the transition."),
        in_ca: bool = typer.Option(False, "--in-ca", help="Through the CA (revoke, hold, lift a hold: rule C17)."),
        json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Move a certificate along its state graph."""
        cert = _certificates(orchestrator_addr).ChangeCertificateState(pb.ChangeCertificateStateRequest(
            certificate_id=certificate_id, state=state, reason=reason, in_ca=in_ca)).certificate
        if json_output:
            print_json({k: v for k, v in as_json(cert).items() if k != "der"})
            return
        Console(soft_wrap=True).print(f"certificate {cert.id} {show_serial(cert.serial_hex)} is {cert.state}",
                                      highlight=False, markup=False)

    root.add_typer(certs, name="certs")


def _search_issued(target: list[str], *, older_than: str = "", template: str = "", card_id: str = "",
                   gateway_id: str = "", reader_id: str = "", task_id: str = "",
                   limit: int = 0) -> list[pb.IssuedCertificate]:
    request = pb.SearchIssuedCertificatesRequest(template=template, card_id=card_id, gateway_id=gateway_id,
                                                 reader_id=reader_id, task_id=task_id, limit=limit)
    if older_than:
        request.older_than.FromTimedelta(duration(older_than))
    return list(_certificates(target).SearchIssuedCertificates(request).certificates)
