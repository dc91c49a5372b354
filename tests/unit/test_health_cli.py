"""`cardline health`: exit 0 only when the server's health service answers SERVING; one of
TARGET or --server; --server reads the server's own settings (listen, TLS files)."""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import typer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from shared.cli import CliFail
from shared.health_cli import register


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def run(*args: str, env: dict[str, str] | None = None):
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:
        """Both commands of the test app stay sub-commands."""

    return CliRunner().invoke(app, ["health", *args], env={"CARDLINE_INSECURE": "1", **(env or {})})


def test_health_exits_0_when_the_server_serves(health_server):
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = run(target)
    assert result.exit_code == 0 and "SERVING" in result.output


def test_health_fails_when_the_server_does_not_serve(health_server):
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run(target)
    assert isinstance(result.exception, CliFail) and "NOT_SERVING" in result.exception.message


def test_health_fails_for_an_unknown_service(health_server):
    _, target = health_server
    result = run(target, "--service", "cardline.orchestrator.v1.Nothing")
    assert isinstance(result.exception, CliFail) and "NOT_FOUND" in result.exception.message


def test_health_server_option_uses_the_servers_own_listen_address(health_server, tmp_path):
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = run("--server", "gateway", env={"CARDLINE_GATEWAY_LISTEN": f"0.0.0.0:{target.rpartition(':')[2]}",
                                             "CARDLINE_GATEWAY_INSECURE": "true"})
    assert result.exit_code == 0, result.output
    assert f"{target} server: SERVING" in result.output      # 0.0.0.0 asked on 127.0.0.1


@pytest.mark.parametrize("args", [[], ["127.0.0.1:1", "--server", "gateway"], ["--server", "printer"]])
def test_health_wants_either_a_target_or_a_known_server(args):
    result = run(*args)
    assert isinstance(result.exception, CliFail) and result.exception.code == 2
