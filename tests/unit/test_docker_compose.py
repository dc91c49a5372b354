"""docker-compose.yml parses and names what the code expects: the commands, flags and
environment variables it uses exist, and the gateway dials the orchestrator's port."""
from __future__ import annotations

import pathlib
import re

import pytest
import typer
import yaml
from typer.main import get_command

from gateway.cli import register as register_gateway
from orchestrator.cli import register as register_orchestrator
from shared import config

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def cli() -> typer.Typer:
    app = typer.Typer()
    register_orchestrator(app)
    register_gateway(app)
    return app


def parse(args: list[str]):
    """Parses a command line with the real CLI, without running it: walks the sub-command
    names, then lets the leaf command check its options."""
    command, rest = get_command(cli()), list(args)
    while hasattr(command, "commands"):
        command, rest = command.commands[rest[0]], rest[1:]
    return command.make_context(command.name, rest).params


def test_compose_has_orchestrator_and_gateway_built_from_this_repo():
    assert set(COMPOSE["services"]) == {"orchestrator", "gateway"}
    assert (ROOT / "Dockerfile").exists()
    for service in COMPOSE["services"].values():
        assert service["build"] == "."


def test_orchestrator_command_is_accepted_by_the_cli():
    params = parse(COMPOSE["services"]["orchestrator"]["command"])
    assert params["listen"] == "0.0.0.0:7400" and str(params["data_dir"]) == "/data"


def test_gateway_command_is_accepted_and_dials_the_orchestrator_port():
    gateway = COMPOSE["services"]["gateway"]
    script = ROOT / gateway["entrypoint"][0].removeprefix("/app/")
    assert script.exists() and "cardline gateway serve" in script.read_text()
    params = parse(["gateway", "serve", *gateway["command"]])
    orch_listen = parse(COMPOSE["services"]["orchestrator"]["command"])["listen"]
    assert params["orchestrator"] == f"orchestrator:{orch_listen.rpartition(':')[2]}"
    assert params["pkcs11_module"][0].name == "libsofthsm2.so"


@pytest.mark.parametrize("service, settings_cls", [("orchestrator", config.OrchestratorSettings),
                                                    ("gateway", config.GatewaySettings)])
def test_cardline_environment_variables_name_real_settings(service, settings_cls):
    prefix = settings_cls.model_config["env_prefix"]
    aliases = getattr(settings_cls, "ALIASES", {})
    environment = COMPOSE["services"][service].get("environment", {})
    names = [k for k in environment if k.startswith("CARDLINE_")]
    assert names, f"{service} sets no CARDLINE_ variable"
    for name in names:
        assert name.startswith(prefix), name
        assert name.removeprefix(prefix).lower() in settings_cls.model_fields, f"{name} names no setting"
    for name in (k for k in environment if "." in k):     # exact keys of the founding document
        assert aliases.get(name) in settings_cls.model_fields, f"{name} names no setting"


def test_c14_compose_passes_the_internal_issued_state_under_its_documented_key():
    environment = COMPOSE["services"]["orchestrator"]["environment"]
    assert environment[config.INTERNAL_ISSUED_STATE_KEY] == "Issued"


def test_no_pin_in_compose_environment():
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"(?i)pin\s*[:=]\s*\"?\d", text)


def test_both_services_talk_mutual_tls_never_plaintext():
    for name, prefix in (("orchestrator", []), ("gateway", ["gateway", "serve"])):
        service = COMPOSE["services"][name]
        params = parse([*prefix, *service["command"]])
        assert params["insecure"] is None and str(params["tls_dir"]) == "/tls", name
        assert any(str(v).endswith(":/tls:ro") for v in service["volumes"]), name
    gateway = parse(["gateway", "serve", *COMPOSE["services"]["gateway"]["command"]])
    assert gateway["gateway_id"] == "station-1"      # its certificate is station-1.crt in the mounted directory
