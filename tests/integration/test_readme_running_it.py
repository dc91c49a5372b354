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
import socket

import pytest

from orchestrator.store import Store
from tests.support.readme import ROOT, ShellSession, commands, section, sh_blocks, substitute

pytestmark = pytest.mark.hardware

NEW_PIN = "246810"
#: What answers a command's hidden prompt, by a word of the command.
PROMPT_ANSWERS = {"process start": f"{NEW_PIN}\n"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_commands() -> list[str]:
    running_it = section((ROOT / "README.md").read_text(), "## Running it")
    blocks = sh_blocks(running_it)
    assert blocks, "README's Running it has no ```sh block"
    return [c for block in blocks for c in commands(block)]


def test_readme_running_it_produces_a_card_as_written(tmp_path: pathlib.Path):
    work = tmp_path / "cardline"
    table = {"127.0.0.1:7400": f"127.0.0.1:{free_port()}", "127.0.0.1:7401": f"127.0.0.1:{free_port()}",
             "var/cardline": str(work)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARDLINE_", "SOFTHSM2_CONF"))}
    (tmp_path / "logs").mkdir()
    session = ShellSession(ROOT, env, tmp_path / "logs")
    outputs = []
    try:
        for command in readme_commands():
            stdin = next((answer for word, answer in PROMPT_ANSWERS.items() if word in command), "")
            done = session.run(substitute(command, table), stdin=stdin)
            outputs.append(done.stdout)
            assert done.returncode == 0, (f"README command failed ({done.returncode}): {command}\n"
                                          f"{done.stdout}\n{done.stderr}\n{session.background_output()}")
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
