"""Configuration errors stop start-up with every violation listed, naming the file."""
import pytest

from shared import config
from shared.errors import ConfigurationError


def test_every_violation_is_listed_not_only_the_first(tmp_path):
    path = tmp_path / "cardline.yaml"
    path.write_text("gateway:\n  listen: nowhere\n  reconnect_min_s: -1\n  colour: blue\n")
    with pytest.raises(ConfigurationError) as err:
        config.load(config.GatewaySettings, config_file=path)
    text = str(err.value)
    assert str(path) in text
    assert "listen: Value error, expected HOST:PORT" in text
    assert "reconnect_min_s" in text and "colour" in text


def test_flags_override_environment_over_file(tmp_path, monkeypatch):
    path = tmp_path / "cardline.yaml"
    path.write_text("orchestrator:\n  listen: 127.0.0.1:1000\n  step_timeout_s: 7\n  heartbeat_interval_s: 3\n")
    monkeypatch.setenv("CARDLINE_ORCHESTRATOR_STEP_TIMEOUT_S", "9")
    settings = config.load(config.OrchestratorSettings, config_file=path, listen="127.0.0.1:2000")
    assert (settings.listen, settings.step_timeout_s, settings.heartbeat_interval_s) == ("127.0.0.1:2000", 9.0, 3.0)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("orchestrator:\n  listen: [\n")
    with pytest.raises(ConfigurationError, match=r"(?s)broken.yaml.*line 3"):
        config.load(config.OrchestratorSettings, config_file=path)


def test_default_database_is_sqlite_in_the_data_dir(tmp_path):
    settings = config.load(config.OrchestratorSettings, data_dir=tmp_path)
    assert settings.effective_database_url() == f"sqlite:///{tmp_path}/cardline.db"
