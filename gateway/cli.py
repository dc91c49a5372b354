"""`cardline gateway ...` commands."""
from __future__ import annotations

import asyncio
import pathlib
from typing import Optional

import typer

from shared import config
from shared.errors import ConfigurationError
from shared.logging import configure


def register(root: typer.Typer) -> None:
    gateway = typer.Typer(help="A gateway: card I/O next to the readers.", no_args_is_help=True)

    @gateway.command("serve")
    def serve(
        listen: Optional[str] = typer.Option(None, help="HOST:PORT for the gateway's own gRPC service."),
        data_dir: Optional[pathlib.Path] = typer.Option(None, help="Directory for the gateway's state."),
        orchestrator: Optional[str] = typer.Option(None, help="HOST:PORT of the orchestrator to dial out to."),
        gateway_id: Optional[str] = typer.Option(None, help="Name of this gateway in the pool (default: host name)."),
        site: Optional[str] = typer.Option(None, help="Site of this gateway, for reader selectors."),
        pkcs11_module: Optional[list[pathlib.Path]] = typer.Option(None, help="PKCS#11 module to load (repeatable)."),
        pcsc: Optional[bool] = typer.Option(None, "--pcsc/--no-pcsc", help="Watch PC/SC readers through pcscd."),
        config_file: Optional[pathlib.Path] = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="YAML configuration file (section 'gateway')."),
        json_logs: bool = typer.Option(False, "--json-logs", help="Log JSON lines."),
    ) -> None:
        """Serve card I/O and keep the link to the orchestrator."""
        from gateway.app import serve as run

        configure(json=json_logs)
        try:
            settings = config.load(config.GatewaySettings, config_file=config_file, listen=listen, data_dir=data_dir,
                                   orchestrator=orchestrator, gateway_id=gateway_id, site=site,
                                   pkcs11_modules=pkcs11_module or None, pcsc=pcsc)
        except ConfigurationError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        asyncio.run(run(settings))

    root.add_typer(gateway, name="gateway")
