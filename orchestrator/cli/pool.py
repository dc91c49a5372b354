"""`cardline readers` and `cardline gateways` (ReaderPoolService)."""
from __future__ import annotations

import json

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table

from orchestrator.cli.client import (
    JSON,
    ORCHESTRATOR,
    all_pages,
    as_json,
    label,
    print_json,
    print_table,
    selector,
    stub,
)
from shared.cli import CliFail
from shared.proto import common_pb2, reader_pool_service_pb2_grpc
from shared.proto import reader_pool_service_pb2 as pb


def _readers_table(readers) -> Table:
    # A live (--watch) table: on a terminal, its values wrap instead of being cut.
    table = Table(*(Column(c, overflow="fold") for c in ("gateway", "site", "reader", "kind", "state", "card",
                                                         "holder", "labels")))
    for r in readers:
        table.add_row(*_reader_row(r))
    return table


def _reader_row(r: pb.PooledReader) -> tuple[str, ...]:
    return (r.gateway_id, r.site, r.reader.reader_id,
            common_pb2.ReaderKind.Name(r.reader.kind).removeprefix("READER_KIND_"),
            label(pb.PooledReaderState, r.state), r.reader.token_label or ("yes" if r.reader.card_present else "-"),
            r.holder, ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items())))


def _watch(pool: reader_pool_service_pb2_grpc.ReaderPoolServiceStub, request: pb.WatchReadersRequest,
           json_output: bool) -> None:
    """Every change as a JSON line, or a live table; until Ctrl-C."""
    rows: dict[tuple[str, str], pb.PooledReader] = {}
    live = None if json_output else Live(_readers_table([]), console=Console(), auto_refresh=False)
    if live is not None:
        live.start()
    try:
        for response in pool.WatchReaders(request):
            if live is None:
                print(json.dumps({"change": label(pb.ReaderChange, response.change),
                                  "reader": as_json(response.reader)}), flush=True)
                continue
            key = (response.reader.gateway_id, response.reader.reader.reader_id)
            if response.change == pb.READER_CHANGE_REMOVED:
                rows.pop(key, None)
            else:
                rows[key] = response.reader
            live.update(_readers_table([rows[k] for k in sorted(rows)]), refresh=True)
    except KeyboardInterrupt:
        return
    finally:
        if live is not None:
            live.stop()


def _wait_for_card(pool: reader_pool_service_pb2_grpc.ReaderPoolServiceStub, chosen: pb.ReaderSelector,
                   timeout_s: float) -> None:
    """Returns once a matching reader holds a card and is free (the watch starts with every
    reader present, then follows changes); CliFail after timeout_s."""
    try:
        for response in pool.WatchReaders(pb.WatchReadersRequest(selector=chosen), timeout=timeout_s):
            if response.change != pb.READER_CHANGE_REMOVED \
                    and response.reader.state == pb.POOLED_READER_STATE_CARD_PRESENT:
                return
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    raise CliFail(f"no matching reader with a card came into the pool within {timeout_s:g} s")


def register(root: typer.Typer) -> None:
    @root.command("readers")
    def readers(
        watch: bool = typer.Option(False, "--watch", help="Keep showing the pool as it changes (Ctrl-C ends)."),
        json_output: bool = typer.Option(False, "--json", help="JSON output (with --watch: one change per line)."),
        gateway: str = typer.Option("", "--gateway-id", "--gateway",
                                    help="Only readers of this gateway (--gateway: old name)."),
        site: str = typer.Option("", help="Only readers of gateways at this site."),
        label_: list[str] = typer.Option([], "--label", help="Only gateways with this KEY=VALUE label (repeatable)."),
        wait_s: float = typer.Option(0.0, "--wait", metavar="SECONDS",
                                     help="First wait up to SECONDS until a matching reader holds a card and is "
                                          "free (exit 1 if none comes), then list."),
        orchestrator_addr: list[str] = ORCHESTRATOR,
    ) -> None:
        """Readers of every gateway: state (empty, card present, busy, leased, offline), holder, site, labels."""
        chosen = selector(gateway, site, label_)
        pool = stub(reader_pool_service_pb2_grpc.ReaderPoolServiceStub, orchestrator_addr)
        if wait_s > 0:
            _wait_for_card(pool, chosen, wait_s)
        if watch:
            _watch(pool, pb.WatchReadersRequest(selector=chosen), json_output)
            return
        found = all_pages(pool.ListReaders, pb.ListReadersRequest(selector=chosen), "readers")
        if json_output:
            print_json([as_json(r) for r in found])
        else:
            print_table("gateway", "site", "reader", "kind", "state", "card", "holder", "labels",
                        rows=[_reader_row(r) for r in found])

    @root.command("gateways")
    def gateways(json_output: bool = JSON, orchestrator_addr: list[str] = ORCHESTRATOR) -> None:
        """Gateways the orchestrator knows: connected or recently gone, since when, last seen, version."""
        found = all_pages(stub(reader_pool_service_pb2_grpc.ReaderPoolServiceStub, orchestrator_addr).ListGateways,
                          pb.ListGatewaysRequest(), "gateways")
        if json_output:
            print_json([as_json(g) for g in found])
            return
        print_table("gateway", "site", "connected", "readers", "since", "last seen", "version", "labels",
                    rows=[(g.gateway_id, g.site, "yes" if g.connected else "no", str(g.readers),
                           g.connected_since.ToDatetime().isoformat(timespec="seconds"),
                           g.last_seen.ToDatetime().isoformat(timespec="seconds"), g.version,
                           ", ".join(f"{k}={v}" for k, v in sorted(g.labels.items()))) for g in found])
