"""`cardline orchestrator serve` and the client commands that talk to an orchestrator."""
from __future__ import annotations

import asyncio
import json
import pathlib
import sys
from typing import Optional

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from shared import config
from shared.errors import ConfigurationError
from shared.logging import configure
from shared.proto import common_pb2
from shared.proto import orchestrator_pb2 as pb
from shared.proto import orchestrator_pb2_grpc
from shared.rpc import error_from_rpc

console = Console(stderr=True, soft_wrap=True)
ORCHESTRATOR = typer.Option("127.0.0.1:7400", "--orchestrator", envvar="CARDLINE_ORCHESTRATOR",
                            help="HOST:PORT of the orchestrator.")
KEY_TYPES = {"EC_P256": common_pb2.KEY_TYPE_EC_P256, "RSA_2048": common_pb2.KEY_TYPE_RSA_2048,
             "RSA_3072": common_pb2.KEY_TYPE_RSA_3072}


def _stub(target: str) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    return orchestrator_pb2_grpc.OrchestratorServiceStub(grpc.insecure_channel(target))


def _fail(exc: grpc.RpcError) -> typer.Exit:
    err = error_from_rpc(exc)
    console.print(f"[red]error[/red] {err.reason}: {err.message}")
    return typer.Exit(1)


def _as_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def register(root: typer.Typer) -> None:
    orchestrator = typer.Typer(help="The orchestrator: store, CAs, processes, the reader pool.", no_args_is_help=True)

    @orchestrator.command("serve")
    def serve(
        listen: Optional[str] = typer.Option(None, help="HOST:PORT to serve gRPC on."),
        data_dir: Optional[pathlib.Path] = typer.Option(None, help="Directory for the SQLite store and the local CA."),
        database_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL (default: SQLite in --data-dir)."),
        config_file: Optional[pathlib.Path] = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="YAML configuration file (section 'orchestrator')."),
        json_logs: bool = typer.Option(False, "--json-logs", help="Log JSON lines."),
    ) -> None:
        """Run the orchestrator."""
        from orchestrator.app import serve as run

        configure(json=json_logs)
        try:
            settings = config.load(config.OrchestratorSettings, config_file=config_file, listen=listen,
                                   data_dir=data_dir, database_url=database_url)
        except ConfigurationError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        asyncio.run(run(settings))

    root.add_typer(orchestrator, name="orchestrator")

    @root.command("produce")
    def produce(
        subject: str = typer.Option(..., help="Subject of the certificates, RFC 4514 (\"CN=Jane Doe,O=Example\")."),
        certificate: list[str] = typer.Option(["EmployeeAuthentication", "EmployeeSignature"], "--certificate",
                                              help="Certificate template, optionally TEMPLATE:KEYTYPE (repeatable)."),
        gateway: str = typer.Option("", help="Only readers of this gateway."),
        reader: str = typer.Option("", help="Only this reader id."),
        pin_stdin: bool = typer.Option(False, "--pin-stdin", help="Read the user PIN from standard input."),
        as_json: bool = typer.Option(False, "--json", help="Print the finished task as JSON."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Produce one card: keys on the card, certificates from the CA, written back."""
        pin = sys.stdin.readline().rstrip("\n") if pin_stdin else typer.prompt("User PIN", hide_input=True)
        certs = []
        for spec in certificate:
            template, _, key_type = spec.partition(":")
            if key_type and key_type not in KEY_TYPES:
                console.print(f"[red]error[/red] --certificate {spec}: key type must be one of {', '.join(KEY_TYPES)}")
                raise typer.Exit(2)
            certs.append(pb.CertificateRequest(template=template, key_type=KEY_TYPES.get(key_type, 0)))
        request = pb.ProduceCardRequest(reader=pb.ReaderSelector(gateway_id=gateway, reader_id=reader),
                                        subject=subject, certificates=certs, user_pin=pin)
        task = None
        try:
            with console.status("producing card…"):
                for event in _stub(orchestrator_addr).ProduceCard(request):
                    console.print(f"  [dim]step {event.step_number}[/dim] {event.message}")
                    if event.HasField("task"):
                        task = event.task
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps(_as_json(task), indent=2))
        ok = task.state == pb.TASK_STATE_SUCCEEDED
        console.print(f"[{'green' if ok else 'red'}]task {task.id} {pb.TaskState.Name(task.state)}[/]")
        raise typer.Exit(0 if ok else 1)

    certs = typer.Typer(help="Certificates in the store.", no_args_is_help=True)

    @certs.command("list")
    def certs_list(
        state: str = typer.Option("", help="Only certificates in this state (e.g. Issued)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        task: str = typer.Option("", help="Only certificates of this task."),
        limit: int = typer.Option(0, help="At most this many (0: all)."),
        as_json: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """List certificates."""
        try:
            resp = _stub(orchestrator_addr).ListCertificates(pb.ListCertificatesRequest(
                state=state, template=template, card_id=card, task_id=task, limit=limit))
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            rows = []
            for c in resp.certificates:
                row = _as_json(c)
                row.pop("der", None)
                rows.append(row)
            print(json.dumps(rows, indent=2))
            return
        table = Table("id", "serial", "subject", "template", "state", "task error")
        for c in resp.certificates:
            table.add_row(c.id, c.serial_hex, c.subject, c.template, c.state, c.task_error)
        Console().print(table)

    root.add_typer(certs, name="certs")

    cards_app = typer.Typer(help="Cards in the store.", no_args_is_help=True)

    @cards_app.command("show")
    def cards_show(card_id: str, as_json: bool = typer.Option(False, "--json", help="JSON output."),
                   orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Show one card and its certificates."""
        try:
            card = _stub(orchestrator_addr).GetCard(pb.GetCardRequest(card_id=card_id)).card
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps(_as_json(card), indent=2))
            return
        Console().print(f"card {card.id}\n  serial {card.serial}\n  state {card.state}\n  template {card.template}\n"
                        f"  certificates {', '.join(card.certificate_ids) or '-'}")

    root.add_typer(cards_app, name="cards")

    @root.command("readers")
    def readers(as_json: bool = typer.Option(False, "--json", help="JSON output."),
                orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Readers of every attached gateway."""
        try:
            resp = _stub(orchestrator_addr).ListReaders(pb.ListReadersRequest())
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(r) for r in resp.readers], indent=2))
            return
        table = Table("gateway", "reader", "kind", "card", "busy")
        for r in resp.readers:
            table.add_row(r.gateway_id, r.reader.reader_id, common_pb2.ReaderKind.Name(r.reader.kind).removeprefix(
                "READER_KIND_"), r.reader.token_label or ("yes" if r.reader.card_present else "-"),
                "yes" if r.busy else "")
        Console().print(table)


