"""shared/logging.py: one formatter for cardline's lines and the libraries' (stdlib logging),
the log level, and secrets never printed."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from shared.logging import configure, get_logger


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _lines(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines()]


def test_json_logs_render_stdlib_and_structlog_lines_alike_at_the_chosen_level(capsys, restore_logging):
    configure(json=True, level="WARNING")
    get_logger("cardline.test").info("not shown")
    get_logger("cardline.test").warning("card task failed", reason="PIN_INCORRECT")
    logging.getLogger("alembic.runtime.migration").warning("Running upgrade %s -> %s", "a", "b")
    logging.getLogger("alembic.runtime.migration").info("not shown either")
    lines = _lines(capsys.readouterr().err)
    assert [(line["event"], line["level"], line["logger"]) for line in lines] == [
        ("card task failed", "warning", "cardline.test"),
        ("Running upgrade a -> b", "warning", "alembic.runtime.migration")]
    assert lines[0]["reason"] == "PIN_INCORRECT" and all("timestamp" in line for line in lines)


def test_secret_keys_are_redacted_in_every_line(capsys, restore_logging):
    configure(json=True, level="DEBUG")
    get_logger("cardline.test").info("oops", pin="1357", so_pin="8642", private_key="-----BEGIN")
    err = capsys.readouterr().err
    assert "1357" not in err and "8642" not in err and "BEGIN" not in err
    assert _lines(err)[0]["pin"] == "***"


def test_an_unknown_log_level_is_refused(restore_logging):
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure(level="loud")
