"""`cardline readers`, `cardline gateways` and `cardline orders ...`: the reader pool from the
command line (registered by orchestrator/cli.py)."""
from __future__ import annotations

import json
import pathlib
import sys

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.cli import ORCHESTRATOR, _as_json, _fail, _stub, console
from shared.proto import common_pb2
from shared.proto import orchestrator_pb2 as pb

KINDS = {"pkcs11": common_pb2.READER_KIND_PKCS11, "pcsc": common_pb2.READER_KIND_PCSC}


def _state(value: int) -> str:
    return pb.PooledReaderState.Name(value).removeprefix("POOLED_READER_STATE_").lower().replace("_", " ")


def _selector(gateway: str = "", site: str = "", labels: list[str] | None = None, kind: str = "",
              card_present: bool = False) -> pb.ReaderSelector:
    selector = pb.ReaderSelector(gateway_id=gateway, site=site, card_present=card_present)
    if kind:
        if kind not in KINDS:
            console.print(f"[red]error[/red] reader kind {kind!r}: expected one of {', '.join(KINDS)}")
            raise typer.Exit(2)
        selector.kind = KINDS[kind]
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            console.print(f"[red]error[/red] label {item!r}: expected KEY=VALUE")
            raise typer.Exit(2)
        selector.labels[key] = value
    return selector


def _readers_table(readers) -> Table:
    table = Table("gateway", "site", "reader", "kind", "state", "card", "holder", "labels")
    for r in readers:
        table.add_row(r.gateway_id, r.site, r.reader.reader_id,
                      common_pb2.ReaderKind.Name(r.reader.kind).removeprefix("READER_KIND_"), _state(r.state),
                      r.reader.token_label or ("yes" if r.reader.card_present else "-"), r.holder,
                      ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items())))
    return table


def _order_line(order: pb.Order) -> str:
    counts = {s: sum(1 for c in order.cards if c.state == s) for s in ("queued", "running", "succeeded", "failed")}
    return (f"order {order.id} ({order.process}): {counts['succeeded']} succeeded, {counts['failed']} failed, "
            f"{counts['running']} running, {counts['queued']} queued")


def _follow_order(stub, order_id: str, as_json: bool) -> pb.Order:
    """Rich progress until every card was attempted; returns the final order."""
    order = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=as_json) as progress:
        bar = None
        for event in stub.WatchOrder(pb.WatchOrderRequest(order_id=order_id)):
            order = event.order
            done = sum(1 for c in order.cards if c.state in ("succeeded", "failed"))
            queued = sorted((c for c in order.cards if c.state == "queued" and c.queue_position),
                            key=lambda c: c.queue_position)
            failed = sum(1 for c in order.cards if c.state == "failed")
            running = [c for c in order.cards if c.state == "running"]
            text = (f"{order.id}  [green]{done - failed} ok[/] [red]{failed} failed[/] "
                    f"[yellow]{len(running)} running[/] {len(order.cards) - done - len(running)} queued"
                    + (f" (next: card {queued[0].index} at position {queued[0].queue_position})" if queued else ""))
            if bar is None:
                bar = progress.add_task(text, total=len(order.cards))
            progress.update(bar, completed=done, description=text)
    return order


def register(root: typer.Typer) -> None:
    @root.command("readers")
    def readers(
        watch: bool = typer.Option(False, "--watch", help="Keep showing the pool as it changes (Ctrl-C ends)."),
        as_json: bool = typer.Option(False, "--json", help="JSON output (with --watch: one event per line)."),
        gateway: str = typer.Option("", help="Only readers of this gateway."),
        site: str = typer.Option("", help="Only readers of gateways at this site."),
        label: list[str] = typer.Option([], "--label", help="Only gateways with this KEY=VALUE label (repeatable)."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Readers of every gateway: state (empty, card present, busy, leased, offline), holder, site, labels."""
        selector = _selector(gateway, site, label)
        stub = _stub(orchestrator_addr)
        try:
            if not watch:
                resp = stub.ListReaders(pb.ListReadersRequest(selector=selector))
                if as_json:
                    print(json.dumps([_as_json(r) for r in resp.readers], indent=2))
                else:
                    Console().print(_readers_table(resp.readers))
                return
            rows: dict[tuple[str, str], pb.PooledReader] = {}
            live = None if as_json else Live(_readers_table([]), console=Console(), auto_refresh=False)
            if live is not None:
                live.start()
            try:
                for event in stub.WatchReaders(pb.WatchReadersRequest(selector=selector)):
                    if as_json:
                        print(json.dumps({"kind": event.kind, "reader": _as_json(event.reader)}), flush=True)
                        continue
                    key = (event.reader.gateway_id, event.reader.reader.reader_id)
                    if event.kind == "removed":
                        rows.pop(key, None)
                    else:
                        rows[key] = event.reader
                    live.update(_readers_table([rows[k] for k in sorted(rows)]), refresh=True)
            finally:
                if live is not None:
                    live.stop()
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        except KeyboardInterrupt:
            return

    @root.command("gateways")
    def gateways(as_json: bool = typer.Option(False, "--json", help="JSON output."),
                 orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Gateways the orchestrator knows: connected or recently gone, since when, last seen, version."""
        try:
            resp = _stub(orchestrator_addr).ListGateways(pb.ListGatewaysRequest())
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(g) for g in resp.gateways], indent=2))
            return
        table = Table("gateway", "site", "connected", "readers", "since", "last seen", "version", "labels")
        for g in resp.gateways:
            table.add_row(g.gateway_id, g.site, "yes" if g.connected else "[red]no[/]", str(g.readers),
                          g.connected_since.ToDatetime().isoformat(timespec="seconds"),
                          g.last_seen.ToDatetime().isoformat(timespec="seconds"), g.version,
                          ", ".join(f"{k}={v}" for k, v in sorted(g.labels.items())))
        Console().print(table)

    orders = typer.Typer(help="Production orders: many cards spread over the pool's readers.", no_args_is_help=True)

    @orders.command("create")
    def orders_create(
        process: str,
        input_file: pathlib.Path = typer.Option(..., "--input-file", help="JSON lines, one object of process "
                                                "inputs per card, e.g. {\"person\": \"Jane Doe\"}."),
        reader_site: str = typer.Option("", "--reader-site", help="Only readers of gateways at this site."),
        reader_gateway: str = typer.Option("", "--reader-gateway", help="Only readers of this gateway."),
        reader_label: list[str] = typer.Option([], "--reader-label", help="Only gateways with this KEY=VALUE label."),
        reader_kind: str = typer.Option("", "--reader-kind", help="pkcs11 or pcsc."),
        secrets_stdin: bool = typer.Option(False, "--secrets-stdin", help="Read the secret inputs (the same for "
                                           "every card) as NAME=VALUE lines from standard input."),
        watch: bool = typer.Option(True, "--watch/--no-watch", help="Follow the order until every card is done."),
        as_json: bool = typer.Option(False, "--json", help="Print the order as JSON."),
        orchestrator_addr: str = ORCHESTRATOR,
    ) -> None:
        """Create a production order: one card per line of --input-file."""
        items = []
        try:
            lines = input_file.read_text().splitlines()
        except OSError as exc:
            console.print(f"[red]error[/red] {input_file}: {exc.strerror}")
            raise typer.Exit(2) from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("expected a JSON object")
                items.append(pb.OrderItem(inputs={k: _json_value(v) for k, v in obj.items()}))
            except ValueError as exc:
                console.print(f"[red]error[/red] {input_file}:{number}: {exc}")
                raise typer.Exit(2) from None
        stub = _stub(orchestrator_addr)
        request = pb.CreateOrderRequest(process=process, items=items, selector=_selector(
            reader_gateway, reader_site, reader_label, reader_kind))
        try:
            definition = next((d for d in stub.ListProcessDefinitions(pb.ListProcessDefinitionsRequest()).definitions
                               if d.name == process), None)
            per_card = set().union(*(set(i.inputs) for i in items)) if items else set()
            given = dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line) if secrets_stdin else {}
            for secret in (definition.secret_inputs if definition else []):
                if secret not in per_card:
                    request.secret_inputs[secret] = given[secret] if secret in given else \
                        typer.prompt(f"{secret} (for every card)", hide_input=True)
            order = stub.CreateOrder(request).order
            console.print(f"order {order.id}: {len(order.cards)} cards of {process}")
            if watch:
                order = _follow_order(stub, order.id, as_json)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        _finish(order, as_json, watched=watch)

    @orders.command("watch")
    def orders_watch(order_id: str, as_json: bool = typer.Option(False, "--json", help="Print the final order as JSON."),
                     orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Follow an order with a progress display until every card is done."""
        try:
            order = _follow_order(_stub(orchestrator_addr), order_id, as_json)
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        _finish(order, as_json, watched=True)

    @orders.command("list")
    def orders_list(as_json: bool = typer.Option(False, "--json", help="JSON output."),
                    orchestrator_addr: str = ORCHESTRATOR) -> None:
        """Orders of this orchestrator run (kept in memory)."""
        try:
            found = _stub(orchestrator_addr).ListOrders(pb.ListOrdersRequest()).orders
        except grpc.RpcError as exc:
            raise _fail(exc) from None
        if as_json:
            print(json.dumps([_as_json(o) for o in found], indent=2))
            return
        table = Table("order", "process", "state", "cards", "succeeded", "failed", "running", "queued", "created")
        for o in found:
            n = {s: sum(1 for c in o.cards if c.state == s) for s in ("succeeded", "failed", "running", "queued")}
            table.add_row(o.id, o.process, pb.OrderState.Name(o.state).removeprefix("ORDER_STATE_"), str(len(o.cards)),
                          str(n["succeeded"]), str(n["failed"]), str(n["running"]), str(n["queued"]),
                          o.created_at.ToDatetime().isoformat(timespec="seconds"))
        Console().print(table)

    root.add_typer(orders, name="orders")


def _json_value(value) -> common_pb2.Value:
    if isinstance(value, dict) and {"type", "id"} <= value.keys():
        return common_pb2.Value(descriptor=common_pb2.CoreObjectDescriptor(
            type=str(value["type"]), template=str(value.get("template", "")), id=str(value["id"])))
    if isinstance(value, list):
        return common_pb2.Value(list=common_pb2.ValueList(values=[_json_value(v) for v in value]))
    if isinstance(value, (dict, type(None))):
        raise ValueError(f"unsupported input value {value!r}")
    return common_pb2.Value(text=str(value))


def _finish(order: pb.Order, as_json: bool, *, watched: bool) -> None:
    if as_json:
        print(json.dumps(_as_json(order), indent=2))
    if not watched:
        return
    console.print(_order_line(order))
    for c in order.cards:
        if c.state == "failed":
            console.print(f"  [red]card {c.index}[/] on {c.gateway_id or '-'} {c.reader_id or ''}: "
                          f"{c.error.reason}: {c.error.message}")
    raise typer.Exit(0 if all(c.state == "succeeded" for c in order.cards) else 1)
