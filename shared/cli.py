"""The `cardline` command. Its sub-commands come from the installed parts through the
`cardline.cli` entry-point group, so shared/ imports neither gateway nor orchestrator."""
from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable, Coroutine
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from shared.config import SettingsT

#: Where the --connect-timeout of client commands is passed on (orchestrator/cli/client.py).
CONNECT_TIMEOUT_ENV = "CARDLINE_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 5.0

app = typer.Typer(help="cardline: card management — orchestrator, gateways and their clients.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)


def _print_version(value: bool) -> None:
    if value:
        from shared.version import VERSION

        typer.echo(f"cardline {VERSION}")
        raise typer.Exit()


@app.callback()
def _client_tls(
    tls_dir: pathlib.Path | None = typer.Option(None, "--tls-dir", envvar="CARDLINE_TLS_DIR",
                                                help="Client commands: directory with ca.crt and NAME.crt/NAME.key."),
    tls_name: str = typer.Option("admin", "--tls-name", envvar="CARDLINE_TLS_NAME",
                                 help="Client commands: which certificate of --tls-dir (role admin, operator, "
                                      "auditor or service)."),
    insecure: bool = typer.Option(False, "--insecure", envvar="CARDLINE_INSECURE",
                                  help="Client commands: plaintext to a server started with --insecure (development)."),
    connect_timeout: float = typer.Option(DEFAULT_CONNECT_TIMEOUT_S, "--connect-timeout", envvar=CONNECT_TIMEOUT_ENV,
                                          min=0.1, help="Client commands given several orchestrators: seconds to "
                                                        "wait for a connection to one before trying the next."),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print cardline's version and exit."),
) -> None:
    """Client commands talk mutual TLS with a certificate of a client role (admin, operator,
    auditor, service; `cardline pki init` makes one named admin, docs/permissions.md); the
    serve commands have TLS options of their own."""
    from shared import tls

    if tls_dir is not None:
        os.environ[tls.CLIENT_TLS_DIR_ENV] = str(tls_dir)
    os.environ[tls.CLIENT_TLS_NAME_ENV] = tls_name
    os.environ[CONNECT_TIMEOUT_ENV] = str(connect_timeout)
    if insecure:
        os.environ[tls.CLIENT_INSECURE_ENV] = "1"


class CliFail(Exception):
    """A command cannot go on: main() prints `message` and exits with `code` (2: bad usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def failure(exc: BaseException) -> CliFail | None:
    """What a command's error means for its user; None for a bug (shown as a traceback)."""
    import grpc

    from shared.errors import CardlineError, ConfigurationError
    from shared.rpc import error_from_rpc

    if isinstance(exc, CliFail):
        return exc
    if isinstance(exc, ConfigurationError):     # this command's own settings (e.g. no TLS material)
        return CliFail(exc.message, 2)
    if isinstance(exc, grpc.RpcError):          # the server's answer
        err = error_from_rpc(exc)
        return CliFail(f"{err.reason}: {err.message}")
    if isinstance(exc, CardlineError):
        return CliFail(f"{exc.reason}: {exc.message}")
    return None


def main() -> None:
    """Every command's errors end here, once: commands raise, main() reports and exits."""
    for ep in sorted(entry_points(group="cardline.cli"), key=lambda e: e.name):
        ep.load()(app)
    try:
        app()
    except Exception as exc:
        fail = failure(exc)
        if fail is None:
            raise
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[red]error[/red] {escape(fail.message)}", highlight=False)
        sys.exit(fail.code)


def run_server(settings_cls: type[SettingsT], serve: Callable[[SettingsT], Coroutine[Any, Any, None]], *,
               json_logs: bool | None, log_level: str | None = None, **options: Any) -> None:
    """What both `serve` commands do: logging, settings (flags > environment > file), serve;
    a configuration error exits 2 with every violation listed. Under --json-logs even that
    error, and a crash, are JSON lines."""
    import asyncio

    from shared import config
    from shared.errors import ConfigurationError
    from shared.logging import configure, get_logger

    json = bool(json_logs)
    configure(json=json)                   # until the settings are read
    log = get_logger("cardline.serve")
    try:
        settings = config.load(settings_cls, json_logs=json_logs or None, log_level=log_level, **options)
        json = settings.json_logs
        configure(json=json, level=settings.log_level)
        asyncio.run(serve(settings))
    except ConfigurationError as exc:
        if json:
            log.error("configuration error", error=str(exc))
        else:
            typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except Exception:
        if not json:
            raise
        log.exception("server failed")
        raise typer.Exit(1) from None
