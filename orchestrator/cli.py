"""`cardline orchestrator serve` and the client commands that talk to an orchestrator."""
from __future__ import annotations

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
from shared.cli import run_server
from shared.proto import common_pb2
from shared.proto import orchestrator_pb2 as pb
from shared.proto import orchestrator_pb2_grpc
from shared.pki_cli import INSECURE, TLS_CA, TLS_CERT, TLS_CRL, TLS_DIR, TLS_KEY
from shared.rpc import error_from_rpc
from shared.tls import client_channel

console = Console(stderr=True, soft_wrap=True)
ORCHESTRATOR = typer.Option("127.0.0.1:7400", "--orchestrator", envvar="CARDLINE_ORCHESTRATOR",
                            help="HOST:PORT of the orchestrator.")
KEY_TYPES = {"EC_P256": common_pb2.KEY_TYPE_EC_P256, "RSA_2048": common_pb2.KEY_TYPE_RSA_2048,
             "RSA_3072": common_pb2.KEY_TYPE_RSA_3072}


def _stub(target: str) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
    """Mutual TLS with the client certificate of `cardline --tls-dir DIR [--tls-name NAME]`
    (or CARDLINE_TLS_DIR / CARDLINE_TLS_NAME); plaintext with `cardline --insecure`."""
    try:
        channel = client_channel(target)
    except ConfigurationError as exc:
        console.print(f"[red]error[/red] {exc.message}")
        raise typer.Exit(2) from None
    return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def _fail(exc: grpc.RpcError) -> typer.Exit:
    err = error_from_rpc(exc)
    console.print(f"[red]error[/red] {err.reason}: {err.message}")
    return typer.Exit(1)


def _duration(text: str):
    import datetime as dt
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        console.print(f"[red]error[/red] duration {text!r}: expected a number and s, m, h or d (e.g. 15m)")
        raise typer.Exit(2)
    return dt.timedelta(seconds=int(text[:-1]) * units[text[-1]])


def _value(text: str) -> common_pb2.Value:
    """NAME=TEXT, or NAME=@Type:template:id for a stored object's CoreObjectDescriptor."""
    if text.startswith("@") and text.count(":") == 2:
        kind, template, object_id = text[1:].split(":")
        return common_pb2.Value(descriptor=common_pb2.CoreObjectDescriptor(type=kind, template=template, id=object_id))
    return common_pb2.Value(text=text)


def _as_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def register(root: typer.Typer) -> None:
    orchestrator = typer.Typer(help="The orchestrator: store, CAs, processes, the reader pool.", no_args_is_help=True)

    @orchestrator.command("serve")
    def serve(
        listen: Optional[str] = typer.Option(None, help="HOST:PORT to serve gRPC on."),
        data_dir: Optional[pathlib.Path] = typer.Option(None, help="Directory for the SQLite store and the local CA."),
        database_url: Optional[str] = typer.Option(None, help="SQLAlchemy URL (default: SQLite in --data-dir)."),
        config_dir: Optional[pathlib.Path] = typer.Option(None, help="Directory of state graphs, templates, "
                                                                     "encodings and processes."),
        config_file: Optional[pathlib.Path] = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="YAML configuration file (section 'orchestrator')."),
        json_logs: bool = typer.Option(False, "--json-logs", help="Log JSON lines."),
        tls_dir: Optional[pathlib.Path] = TLS_DIR, tls_ca: Optional[pathlib.Path] = TLS_CA,
        tls_cert: Optional[pathlib.Path] = TLS_CERT, tls_key: Optional[pathlib.Path] = TLS_KEY,
        tls_crl: Optional[pathlib.Path] = TLS_CRL, insecure: Optional[bool] = INSECURE,
    ) -> None:
        """Run the orchestrator (mutual TLS unless --insecure)."""
        from orchestrator.app import serve as run

        run_server(config.OrchestratorSettings, run, json_logs=json_logs, config_file=config_file, listen=listen,
                   data_dir=data_dir, database_url=database_url, config_dir=config_dir, tls_dir=tls_dir,
                   tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_crl=tls_crl, insecure=insecure)

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

    @certs.command("issued")
    def certs_issued(
        older_than: str = typer.Option("", help="Only those stored longer ago than this (30s, 15m, 2h, 7d)."),
        template: str = typer.Option("", help="Only this certificate template."),
        card: str = typer.Option("", help="Only certificates of this card."),
        gateway: str = typer.Option("", help="Only certificates made through this gateway."),
        reader: str = typer.Option("", help="Only certificates made on this reader."),
        task: str = typer.Option("", help="Only certificates of this task."),
        limit: int = typer.Option(0, help="At most this many (0: all)."),
        as_json: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Certificates left in the internal issued state by failed tasks (rule C4)."""
        request = pb.SearchIssuedCertificatesRequest(template=template, card_id=card, gateway_id=gateway,
                                                     reader_id=reader, task_id=task, limit=limit)
        if older_than:
            request.older_than.FromTimedelta(_duration(older_than))
        try:
            hits = _stub(orchestrator_addr).SearchIssuedCertificates(request).certificates
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(h) for h in hits], indent=2))
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
        as_json: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Handle certificates left in the internal issued state (rule C5), audited."""
        try:
            results = _stub(orchestrator_addr).HandleIssuedCertificates(pb.HandleIssuedCertificatesRequest(
                certificate_ids=certificate_ids or [], revoke_reason=revoke_reason, target_state=target_state)).results
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(r) for r in results], indent=2))
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
        try:
            cert = _stub(orchestrator_addr).ChangeCertificateState(pb.ChangeCertificateStateRequest(
                certificate_id=certificate_id, state=state, reason=reason, in_ca=in_ca)).certificate
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        Console().print(f"certificate {cert.id} {cert.serial_hex} is {cert.state}")

    root.add_typer(certs, name="certs")

    process = typer.Typer(help="Processes: definitions and instances.", no_args_is_help=True)

    @process.command("list")
    def process_list(orchestrator_addr: str = ORCHESTRATOR) -> None:
        """The process definitions the orchestrator loaded."""
        try:
            definitions = _stub(orchestrator_addr).ListProcessDefinitions(pb.ListProcessDefinitionsRequest()).definitions
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        table = Table("process", "inputs", "secret inputs", "tasks")
        for d in definitions:
            table.add_row(d.name, ", ".join(d.inputs), ", ".join(d.secret_inputs), " → ".join(d.task_types))
        Console().print(table)

    @process.command("start")
    def process_start(
        name: str,
        inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=TEXT, or NAME=@Type:template:id for a "
                                                                    "stored object (repeatable)."),
        secrets_stdin: bool = typer.Option(False, "--secrets-stdin",
                                           help="Read secret inputs as NAME=VALUE lines from standard input "
                                                "(otherwise they are prompted for, hidden)."),
        as_json: bool = typer.Option(False, "--json", help="Print the finished instance as JSON."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Start a process instance and follow it."""
        stub = _stub(orchestrator_addr)
        request = pb.StartProcessRequest(process=name)
        for item in inputs:
            key, sep, value = item.partition("=")
            if not sep:
                console.print(f"[red]error[/red] --input {item!r}: expected NAME=VALUE")
                raise typer.Exit(2)
            request.inputs[key].CopyFrom(_value(value))
        try:
            definition = next((d for d in stub.ListProcessDefinitions(pb.ListProcessDefinitionsRequest()).definitions
                               if d.name == name), None)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        secret_names = list(definition.secret_inputs) if definition else []
        given = dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line) if secrets_stdin else {}
        for secret in secret_names:
            request.secret_inputs[secret] = given[secret] if secret in given else \
                typer.prompt(f"{secret}", hide_input=True)
        instance = None
        try:
            for event in stub.StartProcess(request):
                where = ("on_error " if event.on_error else "") + (
                    f"task {event.task_index} {event.task_type}" if event.task_type else "")
                console.print(f"  [dim]{where}[/dim] {event.message}")
                if event.HasField("instance"):
                    instance = event.instance
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps(_as_json(instance), indent=2))
        ok = instance.state == pb.PROCESS_STATE_SUCCEEDED
        console.print(f"[{'green' if ok else 'red'}]process {instance.id} {pb.ProcessState.Name(instance.state)}[/]")
        raise typer.Exit(0 if ok else 1)

    @process.command("show")
    def process_show(instance_id: str, as_json: bool = typer.Option(False, "--json", help="JSON output."),
                     orchestrator_addr: str = ORCHESTRATOR) -> None:
        """A process instance with its process map."""
        try:
            instance = _stub(orchestrator_addr).GetProcessInstance(
                pb.GetProcessInstanceRequest(process_instance_id=instance_id)).instance
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps(_as_json(instance), indent=2))
            return
        Console().print(f"process {instance.id} ({instance.definition}) {pb.ProcessState.Name(instance.state)}")
        for key, value in sorted(_as_json(instance).get("process_map", {}).items()):
            Console().print(f"  {key} = {json.dumps(value)}")

    root.add_typer(process, name="process")

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

    @root.command("reconcile")
    def reconcile(as_json: bool = typer.Option(False, "--json", help="JSON output."),
                  orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Run a reconciliation now (rule C16): pending CA requests are settled at their CA,
        tasks and processes no live run owns are ended."""
        try:
            report = _stub(orchestrator_addr).Reconcile(pb.ReconcileRequest())
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps({k: getattr(report, k) for k in ("examined", "stored", "not_issued", "tasks_ended")},
                             indent=2))
            return
        Console().print(f"examined {report.examined} pending CA requests: {report.stored} certificates found and "
                        f"stored, {report.not_issued} not issued; {report.tasks_ended} tasks/processes ended")

    @root.command("ca-requests")
    def ca_requests(unsettled: bool = typer.Option(False, "--unsettled", help="Only requests still pending."),
                    as_json: bool = typer.Option(False, "--json", help="JSON output."),
                    orchestrator_addr: str = ORCHESTRATOR) -> None:
        """The CA request journal (rule C16): every request sent to a CA and how it ended."""
        try:
            rows = _stub(orchestrator_addr).ListCaRequests(pb.ListCaRequestsRequest(unsettled_only=unsettled)).requests
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(r) for r in rows], indent=2))
            return
        table = Table("request", "CA", "state", "serial", "certificate", "updated")
        for r in rows:
            table.add_row(r.request_id, r.ca, r.state, r.serial_hex, r.certificate_id,
                          r.updated_at.ToDatetime().isoformat(timespec="seconds"))
        Console().print(table)

    from orchestrator import cli_pool     # readers, gateways, orders: the reader pool
    cli_pool.register(root)


