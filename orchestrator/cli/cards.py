"""`cardline produce` and `cardline cards ...` (CardService)."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from orchestrator.cli.client import (
    ORCHESTRATOR,
    as_json,
    console,
    label,
    print_json,
    stub,
)
from shared.cli import CliFail
from shared.proto import card_service_pb2 as pb
from shared.proto import card_service_pb2_grpc, common_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb

KEY_TYPES = {"EC_P256": common_pb2.KEY_TYPE_EC_P256, "RSA_2048": common_pb2.KEY_TYPE_RSA_2048,
             "RSA_3072": common_pb2.KEY_TYPE_RSA_3072}


def certificate_requests(specs: list[str]) -> list[pb.CertificateRequest]:
    """TEMPLATE or TEMPLATE:KEYTYPE each."""
    requests = []
    for spec in specs:
        template, _, key_type = spec.partition(":")
        if key_type and key_type not in KEY_TYPES:
            raise CliFail(f"--certificate {spec}: key type must be one of {', '.join(KEY_TYPES)}", 2)
        requests.append(pb.CertificateRequest(template=template, key_type=KEY_TYPES.get(key_type, 0)))
    return requests


def register(root: typer.Typer) -> None:
    @root.command("produce")
    def produce(
        subject: str = typer.Option(..., help="Subject of the certificates, RFC 4514 (\"CN=Jane Doe,O=Example\")."),
        certificate: list[str] = typer.Option(["EmployeeAuthentication", "EmployeeSignature"], "--certificate",
                                              help="Certificate template, optionally TEMPLATE:KEYTYPE (repeatable)."),
        card_template: str = typer.Option(..., "--card-template",
                                          help="Card template of the new card (e.g. EmployeeCard)."),
        gateway: str = typer.Option("", help="Only readers of this gateway."),
        reader: str = typer.Option("", help="Only this reader id."),
        pin_stdin: bool = typer.Option(False, "--pin-stdin", help="Read the user PIN from standard input."),
        json_output: bool = typer.Option(False, "--json", help="Print the finished task as JSON."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Produce one card: keys on the card, certificates from the CA, written back."""
        pin = sys.stdin.readline().rstrip("\n") if pin_stdin else typer.prompt("User PIN", hide_input=True)
        request = pb.ProduceCardRequest(reader=pool_pb.ReaderSelector(gateway_id=gateway, reader_id=reader),
                                        subject=subject, certificates=certificate_requests(certificate), user_pin=pin,
                                        card_template=card_template)
        task = None
        with console.status("producing card…"):
            for response in stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).ProduceCard(request):
                console.print(f"  [dim]step {response.step_number}[/dim] {response.message}")
                if response.HasField("task"):
                    task = response.task
        if json_output:
            print_json(as_json(task))
        ok = task.state == pb.TASK_STATE_SUCCEEDED
        console.print(f"[{'green' if ok else 'red'}]task {task.id} {pb.TaskState.Name(task.state)}[/]")
        raise typer.Exit(0 if ok else 1)

    cards = typer.Typer(help="Cards in the store.", no_args_is_help=True)

    @cards.command("show")
    def cards_show(card_id: str, json_output: bool = typer.Option(False, "--json", help="JSON output."),
                   orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Show one card and its certificates."""
        card = stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).GetCard(
            pb.GetCardRequest(card_id=card_id)).card
        if json_output:
            print_json(as_json(card))
            return
        Console().print(f"card {card.id}\n  serial {card.serial}\n  state {card.state}\n  template {card.template}\n"
                        f"  certificates {', '.join(card.certificate_ids) or '-'}")

    @cards.command("task")
    def cards_task(task_id: str, json_output: bool = typer.Option(False, "--json", help="JSON output."),
                   orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Show one card task: its state, card, certificates and error."""
        task = stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).GetTask(
            pb.GetTaskRequest(task_id=task_id)).task
        if json_output:
            print_json(as_json(task))
            return
        Console().print(f"task {task.id} ({label(pb.TaskType, task.type)}) {label(pb.TaskState, task.state)}\n"
                        f"  card {task.card_id or '-'}\n  certificates {', '.join(task.certificate_ids) or '-'}"
                        + (f"\n  error {task.error.reason}: {task.error.message}" if task.error.reason else ""))

    root.add_typer(cards, name="cards")
