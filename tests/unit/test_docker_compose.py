"""The image and docker-compose.yml, statically: the image carries a default configuration,
runs as a non-root user and has a healthcheck; the build context leaves out environments,
data and keys; compose's commands, flags and environment variables name what the code has,
no secret travels in the environment, and every server talks mutual TLS. The services
really start in tests/integration/test_compose_services.py."""
from __future__ import annotations

import os
import re

import pytest
import typer
from typer.main import get_command

from gateway.cli import register as register_gateway
from orchestrator.cli import register as register_orchestrator
from shared import config
from shared.health_cli import register as register_health
from tests.support.compose import ROOT, load_compose, parse_dockerfile, start_order

COMPOSE = load_compose()
IMAGE = parse_dockerfile()
Server = type[config.OrchestratorSettings | config.GatewaySettings]
SERVERS: dict[str, Server] = {"orchestrator": config.OrchestratorSettings, "station-1": config.GatewaySettings,
                              "station-2": config.GatewaySettings}


def cli() -> typer.Typer:
    app = typer.Typer()
    register_orchestrator(app)
    register_gateway(app)
    register_health(app)
    return app


def parse(args: list[str]):
    """Parses a command line with the real CLI, without running it."""
    command, rest = get_command(cli()), list(args)
    while hasattr(command, "commands"):
        command, rest = command.commands[rest[0]], rest[1:]
    return command.make_context(command.name, rest).params


def image_settings(settings_cls: Server):
    return config.load(settings_cls, ROOT / IMAGE.copies[IMAGE.env["CARDLINE_CONFIG"]])


def test_image_runs_as_a_non_root_user():
    assert IMAGE.user and IMAGE.user.split(":")[0] not in {"root", "0"}


def test_image_carries_a_default_configuration_that_loads(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CARDLINE_")]:
        monkeypatch.delenv(key)
    assert IMAGE.copies[IMAGE.env["CARDLINE_CONFIG"]] == "deploy/settings.yaml"
    orchestrator = image_settings(config.OrchestratorSettings)
    assert IMAGE.copies[str(orchestrator.config_dir)] == "examples"
    assert str(orchestrator.secrets_dir) == "/run/secrets"
    gateway = image_settings(config.GatewaySettings)
    assert str(gateway.tls_dir) == str(orchestrator.tls_dir) == "/etc/cardline/tls"


def test_image_healthcheck_and_default_command_are_cardline_commands():
    assert IMAGE.entrypoint == ["cardline"]
    assert parse(IMAGE.cmd) is not None
    assert IMAGE.healthcheck[:2] == ["cardline", "health"]
    assert parse(IMAGE.healthcheck[1:])["server"] == "orchestrator"


@pytest.mark.parametrize("excluded", [".venv", "var/", ".git", "**/*.key", "**/*.pass", "**/secrets"])
def test_dockerignore_keeps_environments_data_and_keys_out_of_the_build_context(excluded):
    assert excluded in (ROOT / ".dockerignore").read_text().split()


def test_compose_runs_postgres_an_orchestrator_and_two_stations_in_dependency_order():
    assert start_order(COMPOSE) == ["postgres", "orchestrator", "station-1", "station-2"]
    assert COMPOSE["services"]["postgres"]["image"].startswith("postgres:")
    for name in SERVERS:
        assert COMPOSE["services"][name]["build"] == "."


def test_service_commands_and_healthchecks_are_accepted_by_the_cli():
    assert parse(COMPOSE["services"]["orchestrator"]["command"]) is not None
    for station in ("station-1", "station-2"):
        service = COMPOSE["services"][station]
        script = ROOT / service["entrypoint"][0].removeprefix("/app/")
        assert IMAGE.copies[service["entrypoint"][0]] == str(script.relative_to(ROOT))
        assert "exec cardline gateway serve" in script.read_text()
        assert parse(["gateway", "serve", *service["command"]]) is not None
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD" and parse(check[2:])["server"] == "gateway"


@pytest.mark.parametrize("service", SERVERS)
def test_cardline_environment_variables_name_real_settings(service):
    settings_cls = SERVERS[service]
    prefix = settings_cls.model_config["env_prefix"]
    environment = COMPOSE["services"][service]["environment"]
    names = [k for k in environment if k.startswith("CARDLINE_")]
    assert names, f"{service} sets no CARDLINE_ variable"
    for name in names:
        assert name.startswith(prefix), name
        assert name.removeprefix(prefix).lower() in settings_cls.model_fields, f"{name} names no setting"
    for name in (k for k in environment if "." in k):     # exact keys of the founding document
        assert getattr(settings_cls, "ALIASES", {}).get(name) in settings_cls.model_fields, f"{name} names no setting"


def test_c14_compose_passes_the_internal_issued_state_under_its_documented_key():
    assert COMPOSE["services"]["orchestrator"]["environment"][config.INTERNAL_ISSUED_STATE_KEY] == "Issued"


def test_stations_dial_the_orchestrator_and_are_enrolled_at_the_example_process_site():
    orchestrator_port = image_settings(config.OrchestratorSettings).listen.rpartition(":")[2]
    init = (ROOT / "deploy" / "compose-init.sh").read_text()
    # examples/processes/produce-employee-card.yaml selects site hq: the enrollment places the
    # stations there, their environment claims nothing (docs/stations.md)
    assert re.search(r"cardline gateway enroll .*--site hq ", init)
    for station in ("station-1", "station-2"):
        environment = COMPOSE["services"][station]["environment"]
        assert environment["CARDLINE_GATEWAY_ORCHESTRATOR"] == f"orchestrator:{orchestrator_port}"
        assert "CARDLINE_GATEWAY_SITE" not in environment and "CARDLINE_GATEWAY_LABELS" not in environment
        assert environment["CARDLINE_GATEWAY_GATEWAY_ID"] == station == environment["TOKEN_LABEL"]


def test_no_secret_in_the_compose_environment_only_files():
    for name, service in COMPOSE["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"(?i)pin|puk|pass|secret|key", key):
                assert str(value).startswith("/run/secrets/"), f"{name}: {key} holds a value, not a secret file"
    for secret in COMPOSE["secrets"].values():
        assert secret["file"].startswith("./var/compose/secrets/")       # made by deploy/compose-init.sh


def test_every_server_talks_mutual_tls_with_its_mounted_directory():
    for name, settings_cls in SERVERS.items():
        tls_dir = str(image_settings(settings_cls).tls_dir)
        mounts = {v.split(":")[1]: v for v in COMPOSE["services"][name]["volumes"]}
        assert mounts[tls_dir].endswith(":ro") and mounts[tls_dir].startswith("./var/compose/"), name
        assert "CARDLINE_ORCHESTRATOR_INSECURE" not in COMPOSE["services"][name]["environment"]
        assert "CARDLINE_GATEWAY_INSECURE" not in COMPOSE["services"][name]["environment"]
