"""README "Running it" works as written on a fresh machine: a PKI, the transport PUK file,
a software token made by `cardline tokens init`, an orchestrator and a gateway with the site
the example process selects, and a card produced by `cardline process start`.

The block runs command by command from the repository's top directory (tests/support/
readme.py); the only edits are the fixed substitutions of README_SUBSTITUTIONS: the two
documented addresses become free ports, `var/cardline` a temporary directory. Standard input
answers the one hidden prompt (the card's new PIN)."""
from __future__ import annotations

import os
import pathlib

import pytest

from orchestrator.store import Store
from tests.support.processes import free_port
from tests.support.readme import ROOT, ShellSession, run_block_commands, section, sh_blocks

pytestmark = pytest.mark.hardware

NEW_PIN = "246810"
#: What answers a command's hidden prompt, by a word of the command.
PROMPT_ANSWERS = {"process start": f"{NEW_PIN}\n"}




def readme_blocks() -> list[str]:
    blocks = sh_blocks(section((ROOT / "README.md").read_text(), "## Running it"))
    assert blocks, "README's Running it has no ```sh block"
    return blocks


def readme_table(work: pathlib.Path) -> dict[str, str]:
    """README_SUBSTITUTIONS: the documented addresses -> free ports, var/cardline -> WORK."""
    return {"127.0.0.1:7400": f"127.0.0.1:{free_port()}", "127.0.0.1:7401": f"127.0.0.1:{free_port()}",
            "var/cardline": str(work)}


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CARDLINE_", "SOFTHSM2_CONF"))}


def test_readme_running_it_produces_a_card_as_written(tmp_path: pathlib.Path):
    work = tmp_path / "cardline"
    (tmp_path / "logs").mkdir()
    session = ShellSession(ROOT, clean_environment(), tmp_path / "logs")
    try:
        outputs = run_block_commands(session, readme_blocks(), readme_table(work), PROMPT_ANSWERS)
    finally:
        session.close()
    # The store: both certificates of the card template, Active (its produced state).
    store = Store(f"sqlite:///{work / 'orchestrator' / 'cardline.db'}")
    try:
        certificates = store.certificates.list()
    finally:
        store.close()
    assert sorted(c.template for c in certificates) == ["EmployeeAuthentication", "EmployeeSignature"]
    assert {c.state for c in certificates} == {"Active"}
    assert all("CN=Jane Doe" in c.subject for c in certificates)
    # `cardline certs list --state Active` showed them; pkcs11-tool (the README's last command)
    # lists both certificates on the token.
    listing = outputs[-1]
    assert listing.count("Certificate Object") == 2, listing
    assert "Jane Doe" in listing
