"""`cardline health TARGET`: asks a server's gRPC health service (grpc.health.v1) whether it
serves; exit 0 when SERVING, 1 otherwise. Container HEALTHCHECKs and start-up scripts use it.

Health answers any certificate of the cardline CA, so a gateway checks itself with its own
(`cardline --tls-dir /tls --tls-name station-1 health 127.0.0.1:7401`).
"""
from __future__ import annotations

import time

import typer

from shared.cli import CliFail


def register(root: typer.Typer) -> None:
    @root.command("health")
    def health(
        target: str = typer.Argument(..., help="HOST:PORT of an orchestrator or a gateway."),
        service: str = typer.Option("", help="One service's full name (default: the server as a whole)."),
        wait: float = typer.Option(0.0, help="Seconds to keep asking until it serves (default: ask once)."),
        timeout: float = typer.Option(3.0, help="Seconds one check may take."),
    ) -> None:
        """Exit 0 when the server's health service answers SERVING, 1 otherwise."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from shared.tls import client_channel

        deadline = time.monotonic() + wait
        with client_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                        wait_for_ready=wait > 0).status
                    answer = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as exc:
                    answer = f"{exc.code().name}: {exc.details()}"
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    typer.echo(f"{target} {service or 'server'}: SERVING")
                    return
                if time.monotonic() >= deadline:
                    raise CliFail(f"{target} {service or 'server'}: {answer}")
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

