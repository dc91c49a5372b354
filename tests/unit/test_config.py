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


def _documented_sweeper_yaml() -> str:
    """The sweeper's example configuration exactly as docs/certificate-handling.md shows it."""
    import pathlib
    import re
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "certificate-handling.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.S) if "issued_sweeper" in b]
    assert len(blocks) == 1, "docs/certificate-handling.md shows one sweeper configuration"
    return blocks[0]


def test_c5_documented_sweeper_configuration_is_accepted(tmp_path):
    # Before the fix: "grace_period: Extra inputs are not permitted" (and interval, transition_reason).
    path = tmp_path / "cardline.yaml"
    path.write_text(_documented_sweeper_yaml())
    sweeper = config.load(config.OrchestratorSettings, config_file=path).issued_sweeper
    assert sweeper.enabled is True          # writing the section down is asking for the sweeper
    assert (sweeper.grace_period, sweeper.interval) == (3600.0, 60.0)
    assert (sweeper.revoke_reason, sweeper.target_state, sweeper.transition_reason) == (
        "cessationOfOperation", "Retired", "cardDestroyed")


def test_c5_sweeper_off_without_its_section_or_with_enabled_false(tmp_path):
    assert config.load(config.OrchestratorSettings).issued_sweeper.enabled is False
    path = tmp_path / "cardline.yaml"
    path.write_text("orchestrator:\n  issued_sweeper:\n    enabled: false\n    grace_period: 2d\n")
    sweeper = config.load(config.OrchestratorSettings, config_file=path).issued_sweeper
    assert (sweeper.enabled, sweeper.grace_period) == (False, 172800.0)


def test_c5_sweeper_older_spellings_and_bad_durations(tmp_path):
    path = tmp_path / "cardline.yaml"
    path.write_text("orchestrator:\n  issued_sweeper:\n    grace_period_s: 90\n    interval_s: 5\n")
    sweeper = config.load(config.OrchestratorSettings, config_file=path).issued_sweeper
    assert (sweeper.enabled, sweeper.grace_period, sweeper.interval) == (True, 90.0, 5.0)
    path.write_text("orchestrator:\n  issued_sweeper:\n    grace_period: soon\n    interval: 0s\n")
    with pytest.raises(ConfigurationError) as err:
        config.load(config.OrchestratorSettings, config_file=path)
    assert "grace_period" in str(err.value) and "expected a duration" in str(err.value)
    assert "interval" in str(err.value)


def test_replica_staleness_shorter_than_two_heartbeats_is_refused_naming_the_settings(tmp_path):
    """One rule says when a replica is gone (docs/replicas.md): a staleness that two beats do
    not fit in would take a live replica's tasks, orders and readers away; start-up refuses it."""
    path = tmp_path / "cardline.yaml"
    path.write_text("orchestrator:\n  replica:\n    heartbeat_interval_s: 5\n    stale_after_s: 6\n")
    with pytest.raises(ConfigurationError) as err:
        config.load(config.OrchestratorSettings, config_file=path)
    text = str(err.value)
    assert str(path) in text and "replica" in text
    assert "stale_after_s (6) must be at least twice max(heartbeat_interval_s, poll_interval_s) (5)" in text
    path.write_text("orchestrator:\n  replica:\n    heartbeat_interval_s: 5\n    stale_after_s: 10\n")
    assert config.load(config.OrchestratorSettings, config_file=path).replica.stale_after_s == 10
