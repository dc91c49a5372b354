"""The setting secrets_dir: a card template's relative transport_puk_file is read from it
(default <config_dir>/secrets), an absolute one as it is — so the PUK never has to live in
the configuration directory."""
from __future__ import annotations

import pathlib
import shutil

from orchestrator.services.configuration import load_configuration
from shared import config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_transport_puk_file_is_read_from_secrets_dir(tmp_path):
    loaded = load_configuration(ROOT / "examples", secrets_dir=tmp_path / "secrets")
    assert loaded.templates.card("EmployeeCard").transport_puk_file == str(tmp_path / "secrets" / "transport-puk")


def test_secrets_dir_defaults_to_the_configuration_directorys_secrets(monkeypatch):
    monkeypatch.delenv("CARDLINE_ORCHESTRATOR_SECRETS_DIR", raising=False)
    settings = config.load(config.OrchestratorSettings, config_dir=ROOT / "examples")
    assert settings.effective_secrets_dir() == ROOT / "examples" / "secrets"
    loaded = load_configuration(ROOT / "examples")
    expected = ROOT / "examples" / "secrets" / "transport-puk"
    assert loaded.templates.card("EmployeeCard").transport_puk_file == str(expected)


def test_an_absolute_transport_puk_file_stays_absolute(tmp_path):
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "examples", config_dir)
    templates = config_dir / "templates" / "templates.yaml"
    templates.write_text(templates.read_text().replace("transport_puk_file: transport-puk",
                                                       "transport_puk_file: /run/secrets/card-puk"))
    loaded = load_configuration(config_dir, secrets_dir=tmp_path / "elsewhere")
    assert loaded.templates.card("EmployeeCard").transport_puk_file == "/run/secrets/card-puk"
