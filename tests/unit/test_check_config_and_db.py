"""`cardline check-config` (settings and configuration directory checked without touching
the database or a CA) and `cardline db upgrade` with start-up refusing an un-migrated
database unless told to migrate."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from orchestrator import app as orchestrator_app
from orchestrator.cli import register
from orchestrator.store.store import Store, head_revision
from shared import config
from shared.cli import CliFail
from shared.errors import ConfigurationError

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cardline(*args: str, cwd: pathlib.Path) -> Ran:
    """The command in-process, in directory CWD, exiting as shared/cli.py's main() would."""
    app = typer.Typer()
    register(app)
    here = pathlib.Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(here)
    fail = result.exception
    if isinstance(fail, CliFail):
        return Ran(fail.code, result.stdout, fail.message)
    assert fail is None or isinstance(fail, SystemExit), result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def test_check_config_accepts_the_examples(tmp_path):
    ran = cardline("check-config", "--config-dir", str(EXAMPLES), "--data-dir", str(tmp_path / "data"),
                   "--insecure", "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["ok"] and report["violations"] == [] and report["counts"]["processes"] >= 1
    assert list(tmp_path.iterdir()) == []                       # nothing created


def test_check_config_lists_every_violation_of_a_broken_copy_and_creates_nothing(tmp_path):
    conf = tmp_path / "config"
    shutil.copytree(EXAMPLES, conf)
    templates = conf / "templates" / "templates.yaml"
    templates.write_text(templates.read_text().replace("state_graph: EmployeeCertificate",
                                                       "state_graph: NoSuchGraph", 1))
    process = conf / "processes" / "produce-employee-card.yaml"
    process.write_text(process.read_text().replace("card_template: EmployeeCard", "card_template: NoSuchCard"))
    settings = tmp_path / "settings.yaml"
    settings.write_text("orchestrator:\n  cas: [{name: corp, kind: nonsense, directory: ca}]\n")
    data = tmp_path / "data"
    ran = cardline("check-config", "--config", str(settings), "--config-dir", str(conf), "--data-dir", str(data),
                   cwd=tmp_path)
    assert ran.returncode == 1
    out = ran.stdout
    assert "NoSuchGraph" in out and "NoSuchCard" in out            # the configuration directory's
    assert "kind 'nonsense' is unknown" in out                     # the settings'
    assert "TLS:" in out                                           # no TLS material, not --insecure
    assert "violation(s) in the configuration" in ran.stderr
    assert not data.exists()                                       # no database, no CA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "settings.yaml"]


def _settings(tmp_path: pathlib.Path, **overrides) -> config.OrchestratorSettings:
    return config.load(config.OrchestratorSettings, listen="127.0.0.1:0", data_dir=tmp_path / "orch",
                       config_dir=EXAMPLES, insecure=True, **overrides)


def test_start_refuses_an_unmigrated_database_until_db_upgrade(tmp_path):
    with pytest.raises(ConfigurationError, match=r"cardline db upgrade") as refused:
        asyncio.run(orchestrator_app.start(_settings(tmp_path)))
    assert "empty" in refused.value.message
    assert not (tmp_path / "orch" / "ca").exists()                 # refused before any CA was created

    ran = cardline("db", "upgrade", "--data-dir", str(tmp_path / "orch"), "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["to_revision"] == head_revision()
    again = cardline("db", "upgrade", "--data-dir", str(tmp_path / "orch"), cwd=tmp_path)
    assert "already at revision" in again.stdout

    async def started_and_stopped():
        orch = await orchestrator_app.start(_settings(tmp_path))
        await orch.stop()

    asyncio.run(started_and_stopped())


def test_start_with_migrate_upgrades_the_database(tmp_path):
    async def started_and_stopped():
        orch = await orchestrator_app.start(_settings(tmp_path, migrate=True))
        await orch.stop()

    asyncio.run(started_and_stopped())
    store = Store(f"sqlite:///{tmp_path / 'orch' / 'cardline.db'}")
    try:
        assert store.schema_revision() == head_revision()
    finally:
        store.close()
