"""`cardline produce` and `cardline cards ...` (CardService)."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from orchestrator.cli.client import (
    ORCHESTRATOR,
    REQUEST_ID,
    as_json,
    console,
    label,
    print_json,
    print_table,
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
            raise CliFail(f"--template {spec}: key type must be one of {', '.join(KEY_TYPES)}", 2)
        requests.append(pb.CertificateRequest(template=template,
                                              key_type=KEY_TYPES.get(key_type, common_pb2.KEY_TYPE_UNSPECIFIED)))
    return requests


def _pin_from_stdin() -> str:
    """The first line of standard input: `user_pin=PIN` (as --secrets-stdin reads elsewhere) or the PIN."""
    line = sys.stdin.readline().rstrip("\n")
    name, sep, value = line.partition("=")
    return value if sep and name == "user_pin" else line


def register(root: typer.Typer) -> None:
    @root.command("produce")
    def produce(
        subject: str = typer.Option(..., help="Subject of the certificates, RFC 4514 (\"CN=Jane Doe,O=Example\")."),
        certificate: list[str] = typer.Option(["EmployeeAuthentication", "EmployeeSignature"], "--template",
                                              "--certificate",
                                              help="Certificate template, optionally TEMPLATE:KEYTYPE (repeatable; "
                                                   "--certificate: old name)."),
        gateway_id: str = typer.Option("", "--gateway-id", "--gateway",
                                       help="Only readers of this gateway (--gateway: old name)."),
        reader_id: str = typer.Option("", "--reader-id", "--reader", help="Only this reader (--reader: old name)."),
        secrets_stdin: bool = typer.Option(False, "--secrets-stdin", "--pin-stdin",
                                           help="Read the user PIN from standard input: a line user_pin=PIN, or "
                                                "the PIN alone (--pin-stdin: old name)."),
        card_template: str = typer.Option(..., "--card-template",
                                          help="Card template of the new card (e.g. EmployeeCard)."),
        request_id: str = REQUEST_ID,
        json_output: bool = typer.Option(False, "--json", help="Print the finished task as JSON."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Produce one card: keys on the card, certificates from the CA, written back."""
        pin = _pin_from_stdin() if secrets_stdin else typer.prompt("User PIN", hide_input=True)
        request = pb.ProduceCardRequest(reader=pool_pb.ReaderSelector(gateway_id=gateway_id, reader_id=reader_id),
                                        subject=subject, certificates=certificate_requests(certificate), user_pin=pin,
                                        request_id=request_id, card_template=card_template)
        task = None
        with console.status("producing card…"):
            for response in stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).ProduceCard(request):
                console.print(f"  [dim]step {response.step_number}[/dim] {response.message}")
                if response.HasField("task"):
                    task = response.task
        if task is None:
            raise CliFail("the orchestrator ended the production without reporting its task")
        if json_output:
            print_json(as_json(task))
        ok = task.state == pb.TASK_STATE_SUCCEEDED
        console.print(f"[{'green' if ok else 'red'}]task {task.id} {pb.TaskState.Name(task.state)}[/]")
        raise typer.Exit(0 if ok else 1)

    cards = typer.Typer(help="Cards in the store.", no_args_is_help=True)

    @cards.command("show")
    def cards_show(card_id: str, json_output: bool = typer.Option(False, "--json", help="JSON output."),
                   orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Show one card and its certificates."""
        card = stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).GetCard(
            pb.GetCardRequest(card_id=card_id)).card
        if json_output:
            print_json(as_json(card))
            return
        Console().print(f"card {card.id}\n  serial {card.serial}\n  state {card.state}\n  template {card.template}\n"
                        f"  holder {card.holder or '-'}\n  certificates {', '.join(card.certificate_ids) or '-'}")

    @cards.command("list")
    def cards_list(
        holder: str = typer.Option("", help="Only cards produced for this holder."),
        state: str = typer.Option("", help="Only cards in this state."),
        template: str = typer.Option("", help="Only cards of this card template."),
        token_serial: str = typer.Option("", "--token-serial", help="Only the card with this token serial."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """List cards by holder, state, template and token serial (every page)."""
        service = stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr)
        found: list[pb.Card] = []
        token = ""
        while True:
            page = service.ListCards(pb.ListCardsRequest(holder=holder, state=state, template=template,
                                                         token_serial=token_serial, page_token=token))
            found += page.cards
            token = page.next_page_token
            if not token:
                break
        if json_output:
            print_json([as_json(c) for c in found])
            return
        print_table("id", "serial", "holder", "template", "state", "certificates",
                    rows=[(c.id, c.serial, c.holder or "-", c.template, c.state, str(len(c.certificate_ids)))
                          for c in found])

    @cards.command("set-puk")
    def cards_set_puk(
        token_serial: str = typer.Option(..., "--token-serial", help="The card's token serial."),
        puk_file: typer.FileText = typer.Option(..., "--puk-file", help="File whose first line is the card's PUK "
                                                "(SO PIN); '-' reads standard input."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Keep a card's own PUK in the orchestrator (sealed), for unblock-pin."""
        puk = puk_file.readline().rstrip("\r\n")
        if not puk:
            raise CliFail(f"--puk-file {puk_file.name}: the first line is empty", 2)
        stub(card_service_pb2_grpc.CardServiceStub, orchestrator_addr).SetCardPuk(
            pb.SetCardPukRequest(token_serial=token_serial, puk=puk))
        console.print(f"PUK of card {token_serial} kept, sealed")

    @cards.command("task")
    def cards_task(task_id: str, json_output: bool = typer.Option(False, "--json", help="JSON output."),
                   orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
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
