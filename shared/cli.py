"""The `cardline` command. Its sub-commands come from the installed parts through the
`cardline.cli` entry-point group, so shared/ imports neither gateway nor orchestrator."""
from __future__ import annotations

from importlib.metadata import entry_points

import typer

app = typer.Typer(help="cardline: card management — orchestrator, gateways and their clients.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


def main() -> None:
    for ep in sorted(entry_points(group="cardline.cli"), key=lambda e: e.name):
        ep.load()(app)
    app()
