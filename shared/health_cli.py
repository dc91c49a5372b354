"""`cardline health`: asks a server's gRPC health service (grpc.health.v1) whether it serves;
exit 0 when SERVING, 1 otherwise. Container HEALTHCHECKs and start-up scripts use it.

`cardline health HOST:PORT` is a client command (`cardline --tls-dir DIR ...`).
`cardline health --server orchestrator|gateway` checks the server configured where it runs
(its settings file and environment, as `serve` reads them): its listen address, with its own
certificate — health answers any certificate of the cardline CA.
"""
from __future__ import annotations

import pathlib
import time

import grpc
import typer

from shared.cli import CliFail

SERVERS = ("orchestrator", "gateway")


def _own_channel(server: str, config_file: pathlib.Path | None) -> tuple[str, grpc.Channel]:
    """(target, channel) of the server configured here, with its own TLS files."""
    from shared import config, tls

    settings: config.OrchestratorSettings | config.GatewaySettings
    if server == "orchestrator":
        settings = config.load(config.OrchestratorSettings, config_file)
        files = tls.settings_tls(settings, "health check", "orchestrator", role="orchestrator")
    else:
        settings = config.load(config.GatewaySettings, config_file)
        files = tls.settings_tls(settings, "health check", settings.gateway_id, role="gateway")
    host, _, port = settings.listen.rpartition(":")
    target = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '::') else host}:{port}"
    return target, tls.client_channel(target, files)


def register(root: typer.Typer) -> None:
    @root.command("health")
    def health(
        target: str | None = typer.Argument(None, help="HOST:PORT of an orchestrator or a gateway."),
        server: str | None = typer.Option(None, help="Instead of TARGET: the orchestrator or gateway configured "
                                                        "here (settings file and environment), own certificate."),
        config_file: pathlib.Path | None = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="With --server: the YAML configuration file."),
        service: str = typer.Option("", help="One service's full name (default: the server as a whole)."),
        wait: float = typer.Option(0.0, help="Seconds to keep asking until it serves (default: ask once)."),
        timeout: float = typer.Option(3.0, help="Seconds one check may take."),
    ) -> None:
        """Exit 0 when the server's health service answers SERVING, 1 otherwise."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from shared.tls import client_channel

        if (target is None) == (server is None):
            raise CliFail("give either TARGET (HOST:PORT) or --server orchestrator|gateway", 2)
        if server is not None and server not in SERVERS:
            raise CliFail(f"--server {server!r}: expected one of {', '.join(SERVERS)}", 2)
        if server is not None:
            target, channel = _own_channel(server, config_file)
        elif target is not None:
            channel = client_channel(target)
        what = f"{target} {service or 'server'}"
        deadline = time.monotonic() + wait
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                        wait_for_ready=wait > 0).status
                    answer = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    status, answer = None, f"{exc.code().name}: {exc.details()}"
                if status == health_pb2.HealthCheckResponse.SERVING:
                    typer.echo(f"{what}: SERVING")
                    return
                if time.monotonic() >= deadline:
                    raise CliFail(f"{what}: {answer}")
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
