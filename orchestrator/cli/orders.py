"""`cardline orders ...` (OrderService): many cards spread over the pool's readers."""
from __future__ import annotations

import json
import pathlib

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    REQUEST_ID,
    all_pages,
    as_json,
    console,
    label,
    print_json,
    print_table,
    secret_inputs,
    secrets_from_stdin,
    selector,
    stub,
)
from orchestrator.cli.processes import definition
from shared.cli import CliFail
from shared.proto import common_pb2, order_service_pb2_grpc, process_service_pb2_grpc
from shared.proto import order_service_pb2 as pb

QUEUED, RUNNING = pb.ORDER_CARD_STATE_QUEUED, pb.ORDER_CARD_STATE_RUNNING
SUCCEEDED, FAILED = pb.ORDER_CARD_STATE_SUCCEEDED, pb.ORDER_CARD_STATE_FAILED


def _count(order: pb.Order, state: int) -> int:
    return sum(1 for c in order.cards if c.state == state)


def _order_line(order: pb.Order) -> str:
    return (f"order {order.id} ({order.process}): {_count(order, SUCCEEDED)} succeeded, {_count(order, FAILED)} "
            f"failed, {_count(order, RUNNING)} running, {_count(order, QUEUED)} queued")


def _follow_order(orders: order_service_pb2_grpc.OrderServiceStub, order_id: str, json_output: bool) -> pb.Order:
    """Rich progress until every card was attempted; returns the final order."""
    order = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=json_output) as progress:
        bar = None
        for response in orders.WatchOrder(pb.WatchOrderRequest(order_id=order_id)):
            order = response.order
            failed = _count(order, FAILED)
            done = _count(order, SUCCEEDED) + failed
            running = _count(order, RUNNING)
            queued = sorted((c for c in order.cards if c.state == QUEUED and c.queue_position),
                            key=lambda c: c.queue_position)
            text = (f"{order.id}  [green]{done - failed} ok[/] [red]{failed} failed[/] "
                    f"[yellow]{running} running[/] {len(order.cards) - done - running} queued"
                    + (f" (next: card {queued[0].index} at position {queued[0].queue_position})" if queued else ""))
            if bar is None:
                bar = progress.add_task(text, total=len(order.cards))
            progress.update(bar, completed=done, description=text)
    if order is None:
        raise CliFail(f"the orchestrator sent no state of order {order_id}")
    return order


def _json_value(value) -> common_pb2.Value:
    if isinstance(value, dict) and {"type", "id"} <= value.keys():
        return common_pb2.Value(descriptor=common_pb2.CoreObjectDescriptor(
            type=str(value["type"]), template=str(value.get("template", "")), id=str(value["id"])))
    if isinstance(value, list):
        return common_pb2.Value(list=common_pb2.ValueList(values=[_json_value(v) for v in value]))
    if isinstance(value, (dict, type(None))):
        raise ValueError(f"unsupported input value {value!r}")
    return common_pb2.Value(text=str(value))


def _items(input_file: pathlib.Path) -> list[pb.OrderItem]:
    """One item per non-empty JSON line of INPUT_FILE."""
    try:
        lines = input_file.read_text().splitlines()
    except OSError as exc:
        raise CliFail(f"{input_file}: {exc.strerror}", 2) from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            items.append(pb.OrderItem(inputs={k: _json_value(v) for k, v in obj.items()}))
        except ValueError as exc:
            raise CliFail(f"{input_file}:{number}: {exc}", 2) from None
    return items


def _finish(order: pb.Order, json_output: bool, *, watched: bool) -> None:
    if json_output:
        print_json(as_json(order))
    if not watched:
        return
    console.print(_order_line(order))
    for c in order.cards:
        if c.state == FAILED:
            console.print(f"  [red]card {c.index}[/] on {c.gateway_id or '-'} {c.reader_id or ''}: "
                          f"{c.error.reason}: {c.error.message}")
    raise typer.Exit(0 if all(c.state == SUCCEEDED for c in order.cards) else 1)


def _show_order(order: pb.Order, json_output: bool) -> None:
    if json_output:
        print_json(as_json(order))
        return
    print(f"order {order.id} ({order.process}) {label(pb.OrderState, order.state)}, created "
          f"{order.created_at.ToDatetime().isoformat(timespec='seconds')}")
    print_table("card", "state", "queue", "gateway", "reader", "process instance", "error",
                rows=[(str(c.index), label(pb.OrderCardState, c.state), str(c.queue_position or ""), c.gateway_id,
                       c.reader_id, c.process_instance_id,
                       f"{c.error.reason}: {c.error.message}" if c.error.reason else "") for c in order.cards])


def register(root: typer.Typer) -> None:
    orders = typer.Typer(help="Production orders: many cards spread over the pool's readers.", no_args_is_help=True)

    @orders.command("create")
    def orders_create(
        process: str,
        input_file: pathlib.Path = typer.Option(..., "--input-file", help="JSON lines, one object of process "
                                                "inputs per card, e.g. {\"person\": \"Jane Doe\"}."),
        reader_site: str = typer.Option("", "--site", "--reader-site",
                                        help="Only readers of gateways at this site (--reader-site: old name)."),
        reader_gateway: str = typer.Option("", "--gateway-id", "--reader-gateway",
                                           help="Only readers of this gateway (--reader-gateway: old name)."),
        reader_label: list[str] = typer.Option([], "--label", "--reader-label",
                                               help="Only gateways with this KEY=VALUE label (repeatable; "
                                                    "--reader-label: old name)."),
        reader_kind: str = typer.Option("", "--kind", "--reader-kind",
                                        help="pkcs11 or pcsc (--reader-kind: old name)."),
        request_id: str = REQUEST_ID,
        secrets_stdin: bool = typer.Option(False, "--secrets-stdin", help="Read the secret inputs (the same for "
                                           "every card) as NAME=VALUE lines from standard input."),
        watch: bool = typer.Option(True, "--watch/--no-watch", help="Follow the order until every card is done."),
        json_output: bool = typer.Option(False, "--json", help="Print the order as JSON."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Create a production order: one card per line of --input-file."""
        items = _items(input_file)
        request = pb.CreateOrderRequest(process=process, items=items, request_id=request_id, selector=selector(
            reader_gateway, reader_site, reader_label, reader_kind))
        found = definition(stub(process_service_pb2_grpc.ProcessServiceStub, orchestrator_addr), process)
        per_card = set().union(*(set(i.inputs) for i in items))
        shared_secrets = [s for s in (found.secret_inputs if found else []) if s not in per_card]
        request.secret_inputs.update(secret_inputs(shared_secrets, secrets_from_stdin(secrets_stdin),
                                                   " (for every card)"))
        order_stub = stub(order_service_pb2_grpc.OrderServiceStub, orchestrator_addr)
        order = order_stub.CreateOrder(request).order
        console.print(f"order {order.id}: {len(order.cards)} cards of {process}")
        if watch:
            order = _follow_order(order_stub, order.id, json_output)
        _finish(order, json_output, watched=watch)

    @orders.command("watch")
    def orders_watch(order_id: str, json_output: bool = typer.Option(False, "--json",
                                                                     help="Print the final order as JSON."),
                     orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Follow an order with a progress display until every card is done."""
        order = _follow_order(stub(order_service_pb2_grpc.OrderServiceStub, orchestrator_addr), order_id,
                              json_output)
        _finish(order, json_output, watched=True)

    @orders.command("list")
    def orders_list(json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """The orders of every orchestrator on the database, oldest first."""
        found = all_pages(stub(order_service_pb2_grpc.OrderServiceStub, orchestrator_addr).ListOrders,
                          pb.ListOrdersRequest(), "orders")
        if json_output:
            print_json([as_json(o) for o in found])
            return
        print_table("order", "process", "state", "cards", "succeeded", "failed", "running", "queued", "created",
                    rows=[(o.id, o.process, label(pb.OrderState, o.state), str(len(o.cards)),
                           str(_count(o, SUCCEEDED)), str(_count(o, FAILED)), str(_count(o, RUNNING)),
                           str(_count(o, QUEUED)), o.created_at.ToDatetime().isoformat(timespec="seconds"))
                          for o in found])

    @orders.command("show")
    def orders_show(order_id: str, json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """One order and each of its cards: state, reader, process instance, error."""
        order = stub(order_service_pb2_grpc.OrderServiceStub, orchestrator_addr).GetOrder(
            pb.GetOrderRequest(order_id=order_id)).order
        _show_order(order, json_output)

    @orders.command("cancel")
    def orders_cancel(order_id: str, json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Cancel an order: cards still queued are not produced; cards being produced finish."""
        order = stub(order_service_pb2_grpc.OrderServiceStub, orchestrator_addr).CancelOrder(
            pb.CancelOrderRequest(order_id=order_id)).order
        _show_order(order, json_output)

    root.add_typer(orders, name="orders")
