"""docs/operator-guide.md and the sample of docs/configuration.md work as written.

The operator guide continues README's "Running it": its block runs first, then every ```sh
block of the guide in order, in one shell session (tests/support/readme.py), with README's
substitutions plus 127.0.0.1:7402 (the second station) -> a free port. Blocks whose
preceding paragraph says "not run by the tests" (root, the network, Docker, your own ids)
are left out."""
from __future__ import annotations

import os
import pathlib
import sys

import pytest

from tests.integration.test_readme_running_it import (
    PROMPT_ANSWERS,
    clean_environment,
    readme_blocks,
    readme_table,
)
from tests.support.processes import free_port
from tests.support.readme import ROOT, ShellSession, run_block_commands, runnable_sh_blocks, section

pytestmark = pytest.mark.hardware


def test_operator_guide_commands_work_as_written(tmp_path: pathlib.Path):
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    blocks = runnable_sh_blocks(guide)
    assert len(blocks) >= 5, "the guide's runnable blocks went missing"
    table = {**readme_table(tmp_path / "cardline"), "127.0.0.1:7402": f"127.0.0.1:{free_port()}"}
    (tmp_path / "logs").mkdir()
    session = ShellSession(ROOT, clean_environment(), tmp_path / "logs")
    try:
        run_block_commands(session, readme_blocks(), table, PROMPT_ANSWERS)
        outputs = run_block_commands(session, blocks, table)
    finally:
        session.close()
    text = "\n".join(outputs)
    assert "station-2" in text                                  # pki list shows the enrolled station
    assert (tmp_path / "cardline" / "backup" / "cardline.db").stat().st_size > 0
    assert "orchestrator/ca/" in text                           # the backup holds the local CA
    assert "audit trail intact" in text                         # the productions' audit rows chain


def test_configuration_sample_runs_as_written(tmp_path: pathlib.Path):
    """The addresses of examples/settings.yaml move to free ports through the environment
    (which wins over the file), the written ones by the substitution table; `cardline` is on
    PATH, as after an installation."""
    orchestrator, gateway = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**clean_environment(), "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
           "CARDLINE_ORCHESTRATOR_LISTEN": orchestrator, "CARDLINE_GATEWAY_LISTEN": gateway,
           "CARDLINE_GATEWAY_ORCHESTRATOR": orchestrator}
    table = {"127.0.0.1:7400": orchestrator, "127.0.0.1:7401": gateway, "var/cardline": str(tmp_path / "cardline")}
    sample = section((ROOT / "docs" / "configuration.md").read_text(), "## Sample")
    (tmp_path / "logs").mkdir()
    session = ShellSession(ROOT, env, tmp_path / "logs")
    try:
        outputs = run_block_commands(session, runnable_sh_blocks(sample), table)
    finally:
        session.close()
    assert outputs[-2:] == [f"{orchestrator} server: SERVING\n", f"{gateway} server: SERVING\n"]
    assert (tmp_path / "cardline" / "orchestrator" / "cardline.db").exists()     # --data-dir won over the file
