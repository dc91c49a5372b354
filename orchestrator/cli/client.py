"""What every client command shares: the orchestrator option, stubs, output helpers."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console

from shared.cli import CliFail
from shared.proto import common_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.tls import client_channel

#: Progress and errors go to standard error; tables and JSON to standard output.
console = Console(stderr=True, soft_wrap=True)
ORCHESTRATOR = typer.Option("127.0.0.1:7400", "--orchestrator", envvar="CARDLINE_ORCHESTRATOR",
                            help="HOST:PORT of the orchestrator.")
READER_KINDS = {"pkcs11": common_pb2.READER_KIND_PKCS11, "pcsc": common_pb2.READER_KIND_PCSC}
Stub = TypeVar("Stub")


def stub(stub_class: Callable[[grpc.Channel], Stub], target: str) -> Stub:
    """A client of one service. Mutual TLS with the client certificate of `cardline --tls-dir
    DIR [--tls-name NAME]` (or CARDLINE_TLS_DIR / CARDLINE_TLS_NAME); plaintext with
    `cardline --insecure`."""
    return stub_class(client_channel(target))


def as_json(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def label(enum, value: int) -> str:
    """An enum value for people: TASK_STATE_SUCCEEDED -> "succeeded"."""
    name = enum.Name(value)
    prefix = next(n for n, _ in enum.items() if n.endswith("_UNSPECIFIED")).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower().replace("_", " ")


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
