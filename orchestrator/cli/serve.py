"""`cardline orchestrator serve`."""
from __future__ import annotations

import pathlib

import typer

from shared import config
from shared.cli import run_server
from shared.pki_cli import INSECURE, TLS_CA, TLS_CERT, TLS_CRL, TLS_DIR, TLS_KEY


def register(root: typer.Typer) -> None:
    orchestrator = typer.Typer(help="The orchestrator: store, CAs, processes, the reader pool.", no_args_is_help=True)

    @orchestrator.command("serve")
    def serve(
        listen: str | None = typer.Option(None, help="HOST:PORT to serve gRPC on."),
        data_dir: pathlib.Path | None = typer.Option(None, help="Directory for the SQLite store and the local CA."),
        database_url: str | None = typer.Option(None, help="SQLAlchemy URL (default: SQLite in --data-dir)."),
        config_dir: pathlib.Path | None = typer.Option(None, help="Directory of state graphs, templates, "
                                                                     "encodings and processes."),
        secrets_dir: pathlib.Path | None = typer.Option(None, help="Directory of the secret files the configuration "
                                                                      "names (default: CONFIG_DIR/secrets)."),
        config_file: pathlib.Path | None = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="YAML configuration file (section 'orchestrator')."),
        migrate: bool | None = typer.Option(None, "--migrate", help="Upgrade the database schema at start-up "
                                             "(otherwise start-up refuses a database `cardline db upgrade` has "
                                             "not upgraded)."),
        json_logs: bool = typer.Option(False, "--json-logs", help="Log JSON lines (every line, libraries' too)."),
        log_level: str | None = typer.Option(None, help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL."),
        metrics_listen: str | None = typer.Option(None, help="HOST:PORT to serve Prometheus metrics on "
                                                              "(/metrics); default: none."),
        tls_dir: pathlib.Path | None = TLS_DIR, tls_ca: pathlib.Path | None = TLS_CA,
        tls_cert: pathlib.Path | None = TLS_CERT, tls_key: pathlib.Path | None = TLS_KEY,
        tls_crl: pathlib.Path | None = TLS_CRL, insecure: bool | None = INSECURE,
    ) -> None:
        """Run the orchestrator (mutual TLS unless --insecure)."""
        from orchestrator.app import serve as run

        run_server(config.OrchestratorSettings, run, json_logs=json_logs, log_level=log_level,
                   metrics_listen=metrics_listen, config_file=config_file, listen=listen,
                   data_dir=data_dir, database_url=database_url, config_dir=config_dir, secrets_dir=secrets_dir,
                   migrate=migrate, tls_dir=tls_dir, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_crl=tls_crl,
                   insecure=insecure)

    root.add_typer(orchestrator, name="orchestrator")
