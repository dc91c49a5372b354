"""`cardline tokens init`: a SoftHSM2 token for operators, checked with softhsm2-util and
OpenSC's pkcs11-tool (independent implementations). The command runs as a subprocess: it
initialises the module in its own process with its own SOFTHSM2_CONF."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from shared.transport_puk import TransportPukRule, read_key_file
from tests.support import softhsm
from tests.support.processes import CARDLINE

pytestmark = pytest.mark.hardware

SO_PIN, USER_PIN = "87654321", "4321"


def tokens_init(directory, label: str, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    return subprocess.run([CARDLINE, "tokens", "init", "--softhsm-dir", str(directory), "--label", label, *extra],
                          input=stdin, env=env, capture_output=True, text=True, timeout=120)


def pkcs11_tool(module: str, conf, label: str, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool (OpenSC) not installed")
    return subprocess.run(["pkcs11-tool", "--module", module, "--token-label", label, *args],
                          env={**os.environ, "SOFTHSM2_CONF": str(conf)}, capture_output=True, text=True,
                          timeout=60)


def test_tokens_init_creates_a_token_with_the_pins_from_stdin(tmp_path, softhsm_module):
    done = tokens_init(tmp_path / "hsm", "station-1", f"{SO_PIN}\n{USER_PIN}\n")
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "hsm" / "softhsm2.conf"
    assert f"SOFTHSM2_CONF={conf}" in done.stdout
    [token] = softhsm.list_tokens(conf)
    assert token["label"] == "station-1" and token["user_pin_set"]
    assert f"serial {token['serial']}" in done.stdout
    assert SO_PIN not in done.stdout + done.stderr and USER_PIN not in done.stdout + done.stderr
    # The user PIN logs in; the SO PIN is the token's SO PIN (a wrong one is refused).
    assert pkcs11_tool(softhsm_module, conf, "station-1", "--login", "--pin", USER_PIN,
                       "--list-objects").returncode == 0
    assert pkcs11_tool(softhsm_module, conf, "station-1", "--login", "--pin", "0000",
                       "--list-objects").returncode != 0
    assert pkcs11_tool(softhsm_module, conf, "station-1", "--login", "--login-type", "so", "--so-pin", SO_PIN,
                       "--init-pin", "--new-pin", USER_PIN).returncode == 0
    assert pkcs11_tool(softhsm_module, conf, "station-1", "--login", "--login-type", "so", "--so-pin", "11111111",
                       "--init-pin", "--new-pin", USER_PIN).returncode != 0


def test_tokens_init_reads_the_pins_from_a_file_and_adds_tokens_beside_others(tmp_path, softhsm_module):
    pins = tmp_path / "pins"
    pins.write_text(f"{SO_PIN}\n{USER_PIN}\n")
    assert tokens_init(tmp_path / "hsm", "first", f"{SO_PIN}\n{USER_PIN}\n").returncode == 0
    done = tokens_init(tmp_path / "hsm", "second", "", "--pins-file", str(pins))
    assert done.returncode == 0, done.stderr
    assert sorted(t["label"] for t in softhsm.list_tokens(tmp_path / "hsm" / "softhsm2.conf")) == ["first", "second"]


def test_tokens_init_refuses_missing_pins_and_a_taken_label_and_creates_nothing(tmp_path, softhsm_module):
    conf = tmp_path / "hsm" / "softhsm2.conf"
    missing = tokens_init(tmp_path / "hsm", "station-1", f"{SO_PIN}\n")
    assert missing.returncode == 1 and "SO PIN and the user PIN" in missing.stderr
    assert not conf.exists() or softhsm.list_tokens(conf) == []
    assert tokens_init(tmp_path / "hsm", "station-1", f"{SO_PIN}\n{USER_PIN}\n").returncode == 0
    taken = tokens_init(tmp_path / "hsm", "station-1", f"{SO_PIN}\n{USER_PIN}\n")
    assert taken.returncode == 1 and "ALREADY_EXISTS" in taken.stderr
    assert len(softhsm.list_tokens(conf)) == 1


def _so_pin_works(module: str, conf, label: str, so_pin: str) -> bool:
    return pkcs11_tool(module, conf, label, "--login", "--login-type", "so", "--so-pin", so_pin,
                       "--init-pin", "--new-pin", USER_PIN).returncode == 0


def test_blank_tokens_get_their_own_transport_puk_derived_from_the_key(tmp_path, softhsm_module):
    """`tokens new-transport-key` + `tokens init --transport-puk-key`: each token's SO PIN is
    the transport PUK for its own serial (what the orchestrator derives), so two blank tokens
    have different PUKs and neither opens with the other's."""
    key_file = tmp_path / "transport-puk.key"
    made = subprocess.run([CARDLINE, "tokens", "new-transport-key", str(key_file)], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([CARDLINE, "tokens", "new-transport-key", str(key_file)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    rule = TransportPukRule(read_key_file(key_file))
    for label in ("blank-1", "blank-2"):
        done = tokens_init(tmp_path / "hsm", label, f"{USER_PIN}\n", "--transport-puk-key", str(key_file))
        assert done.returncode == 0, done.stderr
    conf = tmp_path / "hsm" / "softhsm2.conf"
    serials = {t["label"]: t["serial"] for t in softhsm.list_tokens(conf)}
    puks = {label: rule.puk_for(serial) for label, serial in serials.items()}
    assert puks["blank-1"] != puks["blank-2"]
    assert _so_pin_works(softhsm_module, conf, "blank-1", puks["blank-1"])
    assert _so_pin_works(softhsm_module, conf, "blank-2", puks["blank-2"])
    assert not _so_pin_works(softhsm_module, conf, "blank-1", puks["blank-2"])
    assert pkcs11_tool(softhsm_module, conf, "blank-2", "--login", "--pin", USER_PIN,
                       "--list-objects").returncode == 0
