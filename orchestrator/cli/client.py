"""What every client command shares: the orchestrator option, stubs (with failover over
several orchestrators), output helpers."""
from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from shared.cli import CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S, CliFail
from shared.config import orchestrator_addresses
from shared.proto import common_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.tls import client_channel

#: Progress and errors go to standard error; tables and JSON to standard output.
console = Console(stderr=True, soft_wrap=True)
ORCHESTRATOR = typer.Option(["127.0.0.1:7400"], "--orchestrator", envvar="CARDLINE_ORCHESTRATOR",
                            help="HOST:PORT of an orchestrator: repeatable, or several separated by commas; a call "
                                 "that cannot reach one is made on the next (docs/operator-guide.md, failover).")
READER_KINDS = {"pkcs11": common_pb2.READER_KIND_PKCS11, "pcsc": common_pb2.READER_KIND_PCSC}
Stub = TypeVar("Stub")
#: Calls without side effects, by name: repeated on the next orchestrator even when the first
#: may have received them.
READ_PREFIXES = ("Get", "List", "Search", "Verify")


def stub(stub_class: Callable[[grpc.Channel], Stub], target: str | list[str]) -> Stub:
    """A client of one service on the orchestrator(s) of TARGET (a --orchestrator value).
    Mutual TLS with the certificate of `cardline --tls-dir DIR [--tls-name NAME]` (or
    CARDLINE_TLS_DIR / CARDLINE_TLS_NAME); plaintext with `cardline --insecure`."""
    try:
        addresses = orchestrator_addresses(target)
    except ValueError as exc:
        raise CliFail(f"--orchestrator: {exc}", 2) from None
    if len(addresses) == 1:
        return stub_class(client_channel(addresses[0]))
    return cast(Stub, FailoverStub(stub_class, addresses, connect_timeout_s()))


class FailoverStub:
    """A stub over several orchestrators, tried in turn from the last that answered. A call
    moves on to the next address when it did not reach this one: no connection within the
    connect timeout (a dead host, a frozen process), or UNAVAILABLE before the connection was
    up. UNAVAILABLE once connected moves on only for a read (READ_PREFIXES) or a request with
    a request id (docs/api.md: the repeat creates nothing twice on replicas of one database).
    A stream moves on only before it starts; once started, its errors are the caller's."""

    def __init__(self, stub_class: Callable[[grpc.Channel], Any], addresses: list[str], connect_timeout: float) -> None:
        self._stub_class = stub_class
        self._addresses = addresses
        self._connect_timeout = connect_timeout
        self._stubs: dict[str, tuple[grpc.Channel, Any]] = {}
        self._first = 0                  # the address that answered last

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if not method[:1].isupper():     # RPC methods only (stubs name them in CamelCase)
            raise AttributeError(method)
        return functools.partial(self._call, method)

    def _call(self, method: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        missed: list[str] = []
        count = len(self._addresses)
        for position in ((self._first + step) % count for step in range(count)):
            address = self._addresses[position]
            if address not in self._stubs:
                channel = client_channel(address)
                # Closed at exit: a channel watched for its connectivity keeps a thread that
                # would otherwise hold the interpreter's exit up.
                atexit.register(channel.close)
                self._stubs[address] = channel, self._stub_class(channel)
            channel, service = self._stubs[address]
            state = _connection(channel, self._connect_timeout)
            if state is None:
                missed.append(f"{address}: no connection within {self._connect_timeout:g} s")
                continue
            try:
                answer = getattr(service, method)(request, *args, **kwargs)
            except grpc.RpcError as exc:
                repeatable = state is not grpc.ChannelConnectivity.READY or _repeatable(method, request)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not repeatable:
                    raise
                missed.append(f"{address}: {exc.details()}")
                continue
            self._first = position
            return answer
        raise CliFail(f"{method}: no orchestrator reachable - " + "; ".join(missed))


def _repeatable(method: str, request: Any) -> bool:
    return method.startswith(READ_PREFIXES) or bool(getattr(request, "request_id", ""))


def _connection(channel: grpc.Channel, timeout_s: float) -> grpc.ChannelConnectivity | None:
    """READY, or TRANSIENT_FAILURE (connecting failed: a call fails at once, unsent), as soon
    as the channel gets there; None when it is still connecting after TIMEOUT_S."""
    settled: list[grpc.ChannelConnectivity] = []
    event = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            settled.append(state)
            event.set()

    channel.subscribe(seen, try_to_connect=True)
    try:
        event.wait(timeout_s)
    finally:
        channel.unsubscribe(seen)
    return settled[0] if settled else None


def connect_timeout_s() -> float:
    """`cardline --connect-timeout` (CARDLINE_CONNECT_TIMEOUT): how long a call waits for a
    connection to one of several orchestrators before it tries the next."""
    return float(os.environ.get(CONNECT_TIMEOUT_ENV) or DEFAULT_CONNECT_TIMEOUT_S)


REQUEST_ID = typer.Option("", "--request-id", help="Your id for this request (e.g. a UUID): a repeat with the same "
                                                  "id returns the first result instead of producing again.")
JSON = typer.Option(False, "--json", help="JSON output (protobuf's JSON mapping, every field, zero values "
                                          "included).")


def as_json(message) -> dict[str, Any]:
    """One stable shape for every command's --json: protobuf's JSON mapping with the proto's
    field names, enum names, and every field even when it holds its zero value."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def print_table(*columns: str, rows: Iterable[Sequence[str]]) -> None:
    """A table on standard output whose values are never cut: on a terminal too narrow for a
    column, its values wrap (fold) onto more lines; without a terminal (a pipe, a file) the
    table is as wide as its widest values."""
    rows = [[str(v) for v in row] for row in rows]
    table = Table(*(Column(c, overflow="fold") for c in columns))
    for row in rows:
        table.add_row(*(Text(v) for v in row))     # Text: values are never read as rich markup
    out = Console(soft_wrap=True, highlight=False)
    if not out.is_terminal:
        widths = [max([len(c), *(len(line) for r in rows for line in r[i].splitlines() or [""])])
                  for i, c in enumerate(columns)]
        out = Console(soft_wrap=True, highlight=False, width=max(80, sum(widths) + 3 * len(widths) + 1))
    out.print(table)


def all_pages(call: Callable[[Any], Any], request: Any, field: str, limit: int = 0) -> list[Any]:
    """Every item of a List RPC, page after page (at most `limit` items, 0: all)."""
    items: list[Any] = []
    while True:
        if limit:
            request.page_size = min(limit - len(items), 1000)
        response = call(request)
        items.extend(getattr(response, field))
        if not response.next_page_token or (limit and len(items) >= limit):
            return items[:limit] if limit else items
        request.page_token = response.next_page_token


def confirm(question: str, yes: bool) -> None:
    """Asks before mass changes unless --yes; without a terminal to ask on, --yes is needed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliFail(f"{question} - not confirmed: no terminal to ask on; give --yes to go ahead", 2)
    if not typer.confirm(question, default=False):
        raise CliFail("not confirmed; nothing was done", 1)


def label(enum, value: int) -> str:
    """An enum value for people: TASK_STATE_SUCCEEDED -> "succeeded"."""
    name = enum.Name(value)
    prefix = next(n for n in enum.DESCRIPTOR.values_by_name if n.endswith("_UNSPECIFIED")).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower().replace("_", " ")


def enum_value(enum, text: str, option: str) -> int:
    """The inverse of label(): "running" -> TASK_STATE_RUNNING's value; empty: the zero value (any)."""
    if not text:
        return 0
    choices = {label(enum, v): v for v in enum.values() if v}
    key = text.lower().replace("_", " ")
    if key not in choices:
        raise CliFail(f"{option} {text!r}: expected one of {', '.join(sorted(choices))}", 2)
    return choices[key]


def when(ts: Any) -> str:
    """A protobuf Timestamp for people; \"-\" when unset."""
    return ts.ToDatetime().isoformat(timespec="seconds") if ts.seconds else "-"


def selector(gateway: str = "", site: str = "", labels: list[str] | None = None, kind: str = "",
             card_present: bool = False) -> pool_pb.ReaderSelector:
    result = pool_pb.ReaderSelector(gateway_id=gateway, site=site, card_present=card_present)
    if kind:
        if kind not in READER_KINDS:
            raise CliFail(f"reader kind {kind!r}: expected one of {', '.join(READER_KINDS)}", 2)
        result.kind = READER_KINDS[kind]
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliFail(f"label {item!r}: expected KEY=VALUE", 2)
        result.labels[key] = value
    return result


def secret_inputs(names, given: dict[str, str], prompt_suffix: str = "") -> dict[str, str]:
    """Each secret input from `given` (read from standard input), else prompted for, hidden."""
    return {name: given[name] if name in given else typer.prompt(f"{name}{prompt_suffix}", hide_input=True)
            for name in names}


def secrets_from_stdin(read: bool) -> dict[str, str]:
    """NAME=VALUE lines of standard input when READ, else nothing."""
    return dict(line.rstrip("\n").split("=", 1) for line in sys.stdin if "=" in line) if read else {}
