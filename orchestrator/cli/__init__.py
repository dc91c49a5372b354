"""`cardline orchestrator serve` and the client commands that talk to an orchestrator, one
module per resource. Commands raise (shared.cli.CliFail, gRPC errors); shared/cli.py's main()
reports them, once."""
from __future__ import annotations

import typer

from orchestrator.cli import admin, audit, ca, cards, certificates, orders, pool, processes, serve, tasks


def register(root: typer.Typer) -> None:
    for module in (serve, admin, cards, certificates, processes, tasks, pool, orders, ca, audit):
        module.register(root)
