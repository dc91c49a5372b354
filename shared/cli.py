"""The `cardline` command. Its sub-commands come from the installed parts through the
`cardline.cli` entry-point group, so shared/ imports neither gateway nor orchestrator."""
from __future__ import annotations

import os
import pathlib
from importlib.metadata import entry_points
from typing import Optional

import typer

app = typer.Typer(help="cardline: card management — orchestrator, gateways and their clients.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


def _print_version(value: bool) -> None:
    if value:
        from shared.version import VERSION

        typer.echo(f"cardline {VERSION}")
        raise typer.Exit()


@app.callback()
def _client_tls(
    tls_dir: Optional[pathlib.Path] = typer.Option(None, "--tls-dir", envvar="CARDLINE_TLS_DIR",
                                                   help="Client commands: directory with ca.crt and NAME.crt/NAME.key."),
    tls_name: str = typer.Option("admin", "--tls-name", envvar="CARDLINE_TLS_NAME",
                                 help="Client commands: which certificate of --tls-dir (a role 'client' one)."),
    insecure: bool = typer.Option(False, "--insecure", envvar="CARDLINE_INSECURE",
                                  help="Client commands: plaintext to a server started with --insecure (development)."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print cardline's version and exit."),
) -> None:
    """Client commands talk mutual TLS with a client certificate (`cardline pki init` makes
    one named admin); the serve commands have TLS options of their own."""
    from shared import tls

    if tls_dir is not None:
        os.environ[tls.CLIENT_TLS_DIR_ENV] = str(tls_dir)
    os.environ[tls.CLIENT_TLS_NAME_ENV] = tls_name
    if insecure:
        os.environ[tls.CLIENT_INSECURE_ENV] = "1"


def main() -> None:
    for ep in sorted(entry_points(group="cardline.cli"), key=lambda e: e.name):
        ep.load()(app)
    app()


def run_server(settings_cls, serve, *, json_logs: bool, **options) -> None:
    """What both `serve` commands do: logging, settings (flags > environment > file), serve;
    a configuration error exits 2 with every violation listed."""
    import asyncio

    from shared import config
    from shared.errors import ConfigurationError
    from shared.logging import configure

    configure(json=json_logs)
    try:
        settings = config.load(settings_cls, **options)
        asyncio.run(serve(settings))
    except ConfigurationError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
