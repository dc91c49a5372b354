"""The setting secrets_dir: a card template's transport_puk_key_file is read from it (default
<config_dir>/secrets) and must stay inside it — a `../` or an absolute path elsewhere is a
configuration error naming file, line and field."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from orchestrator.services.configuration import RejectedConfiguration, load_configuration
from shared import config
from tests.support.transport_puk import KEY_FILE, write_transport_key

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_transport_puk_key_file_is_read_from_secrets_dir(tmp_path):
    write_transport_key(tmp_path / "secrets")
    loaded = load_configuration(ROOT / "examples", secrets_dir=tmp_path / "secrets")
    assert loaded.templates.card("EmployeeCard").transport_puk_key_file == str(tmp_path / "secrets" / KEY_FILE)
    assert not loaded.warnings


def test_secrets_dir_defaults_to_the_configuration_directorys_secrets(monkeypatch):
    monkeypatch.delenv("CARDLINE_ORCHESTRATOR_SECRETS_DIR", raising=False)
    settings = config.load(config.OrchestratorSettings, config_dir=ROOT / "examples")
    assert settings.effective_secrets_dir() == ROOT / "examples" / "secrets"
    loaded = load_configuration(ROOT / "examples")
    expected = ROOT / "examples" / "secrets" / KEY_FILE
    assert loaded.templates.card("EmployeeCard").transport_puk_key_file == str(expected)


def _config_naming(tmp_path: pathlib.Path, key_file: str) -> pathlib.Path:
    config_dir = tmp_path / "config"
    shutil.copytree(ROOT / "examples", config_dir)
    templates = config_dir / "templates" / "templates.yaml"
    text = templates.read_text()
    assert f"transport_puk_key_file: {KEY_FILE}" in text
    templates.write_text(text.replace(f"transport_puk_key_file: {KEY_FILE}", f"transport_puk_key_file: {key_file}",
                                      1))
    return config_dir


@pytest.mark.parametrize("key_file", ["../transport-puk.key", "sub/../../transport-puk.key", "/etc/passwd"])
def test_secret_file_outside_secrets_dir_is_a_configuration_error_naming_file_line_field(tmp_path, key_file):
    config_dir = _config_naming(tmp_path, key_file)
    write_transport_key(tmp_path)                       # exists, but outside the secrets directory
    with pytest.raises(RejectedConfiguration) as caught:
        load_configuration(config_dir, secrets_dir=tmp_path / "secrets")
    [violation] = caught.value.violations
    templates = config_dir / "templates" / "templates.yaml"
    line = next(i for i, text in enumerate(templates.read_text().splitlines(), 1) if key_file in text)
    assert (violation.source, violation.line, violation.field_path) == (str(templates), line,
                                                                          "transport_puk_key_file")
    assert "outside the secrets directory" in violation.message and key_file in violation.message


def test_an_absolute_secret_file_inside_secrets_dir_is_accepted(tmp_path):
    key = write_transport_key(tmp_path / "secrets")
    loaded = load_configuration(_config_naming(tmp_path, str(key)), secrets_dir=tmp_path / "secrets")
    assert loaded.templates.card("EmployeeCard").transport_puk_key_file == str(key)


def test_a_secret_mounted_as_a_link_into_secrets_dir_is_accepted(tmp_path):
    """Docker and Kubernetes mount secrets as links: the confinement is by name, not by target."""
    target = write_transport_key(tmp_path / "mounted")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / KEY_FILE).symlink_to(target)
    loaded = load_configuration(ROOT / "examples", secrets_dir=tmp_path / "secrets")
    assert loaded.templates.card("EmployeeCard").transport_puk_key_file == str(tmp_path / "secrets" / KEY_FILE)


def test_a_transport_puk_key_file_that_holds_no_key_is_a_located_configuration_error(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / KEY_FILE).write_text("12345678\n")      # a PUK, not a key
    with pytest.raises(RejectedConfiguration) as caught:
        load_configuration(ROOT / "examples", secrets_dir=tmp_path / "secrets")
    assert all(v.field_path == "transport_puk_key_file" and "64 hexadecimal digits" in v.message
               for v in caught.value.violations) and caught.value.violations
    assert "12345678" not in str(caught.value)
