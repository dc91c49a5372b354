"""pytest fixtures: private SoftHSM2 tokens (plugin loaded by tests/conftest.py).

Why one SoftHSM2 directory per test session and a fresh token per test: SoftHSM2 reads
SOFTHSM2_CONF and scans its token directory only in C_Initialize, and python-pkcs11 keeps
one loaded module per path per process. So `softhsm_conf` (session scope) sets SOFTHSM2_CONF
for the whole process once, and `softhsm_token` initialises a new token with a unique label
in that directory for each test (`softhsm2-util --init-token --free`, a child process). A
Pkcs11TokenDriver built after the token exists sees it: the previous driver's close()
finalised the module, and building a new one initialises it again. Tests must therefore
close their drivers (the `pkcs11_driver` style fixtures in the test modules do). Each token
is deleted after its test. Subprocesses (a gateway under test) inherit SOFTHSM2_CONF.

Test tokens are made by `softhsm2-util` in a child process (init_token below), not by
`cardline tokens init`'s in-process PKCS#11 (gateway/softhsm.py): this pytest process already
holds the module, and SoftHSM2 reads its configuration only when the module is initialised.
The PINs go on softhsm2-util's command line, which is acceptable for test tokens only.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass

import pytest

from gateway.softhsm import find_module, make_softhsm_dir
from shared.errors import ConfigurationError
from tests.support.transport_puk import transport_puk

__all__ = ["SoftHsmError", "SoftHsmToken", "delete_token", "find_module", "init_blank_token", "init_token",
           "list_tokens",
           "make_softhsm_dir", "token_slot_id"]


class SoftHsmError(RuntimeError):
    pass


def init_token(conf_path: str | os.PathLike, label: str, so_pin: str, user_pin: str) -> str:
    """Initialises the first free token of that directory; returns its serial (hex text)."""
    if any(t["label"] == label for t in list_tokens(conf_path)):
        raise SoftHsmError(f"a token labelled {label!r} already exists in {conf_path}")
    _util(conf_path, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin)
    for token in list_tokens(conf_path):
        if token["label"] == label:
            return token["serial"]
    raise SoftHsmError(f"token {label!r} was initialised but softhsm2-util does not show it")


def init_blank_token(conf_path: str | os.PathLike, label: str, user_pin: str) -> str:
    """A token like a blank card from the factory: its SO PIN is the tests' transport PUK for
    its serial (tests/support/transport_puk.py). Returns the serial."""
    serial = init_token(conf_path, label, _FIRST_SO_PIN, user_pin)
    _change_so_pin(conf_path, label, _FIRST_SO_PIN, transport_puk(serial))
    return serial


_FIRST_SO_PIN = "12345678"      # until the serial, which the transport PUK is derived for, is known


def _change_so_pin(conf_path: str | os.PathLike, label: str, so_pin: str, puk: str) -> None:
    exe = shutil.which("pkcs11-tool")
    if exe is None:
        raise SoftHsmError("pkcs11-tool not found (install opensc)")
    proc = subprocess.run([exe, "--module", find_module(), "--token-label", label, "--login", "--login-type", "so",
                           "--so-pin", so_pin, "--change-pin", "--new-pin", puk],
                          env={**os.environ, "SOFTHSM2_CONF": str(conf_path)}, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise SoftHsmError(f"pkcs11-tool --change-pin (SO) failed: {proc.stderr.strip() or proc.stdout.strip()}")


def token_slot_id(conf_path: str | os.PathLike, serial: str) -> int:
    """The slot id SoftHSM2 gives the token (derived from its serial, stable across restarts)."""
    for token in list_tokens(conf_path):
        if token["serial"] == serial:
            return token["slot_id"]
    raise SoftHsmError(f"no token with serial {serial} in {conf_path}")


def delete_token(conf_path: str | os.PathLike, serial: str) -> None:
    _util(conf_path, "--delete-token", "--serial", serial)


def list_tokens(conf_path: str | os.PathLike) -> list[dict]:
    """Initialised tokens as softhsm2-util shows them: [{slot_id, serial, label, user_pin_set}]."""
    out = _util(conf_path, "--show-slots")
    tokens = []
    # One block per slot: "Slot <n>" then indented info lines.
    for block in re.split(r"^Slot (?=\d+\s*$)", out, flags=re.M)[1:]:
        slot_id = int(block.split(None, 1)[0])
        fields = dict(re.findall(r"^\s+(Serial number|Label|Initialized|User PIN init\.):\s*(.*?)\s*$", block,
                                 flags=re.M))
        if fields.get("Initialized") == "yes":
            tokens.append({"slot_id": slot_id, "serial": fields.get("Serial number", ""),
                           "label": fields.get("Label", ""), "user_pin_set": fields.get("User PIN init.") == "yes"})
    return tokens


def _util(conf_path: str | os.PathLike, *args: str) -> str:
    exe = shutil.which("softhsm2-util")
    if exe is None:
        raise SoftHsmError("softhsm2-util not found (install softhsm2)")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf_path)}
    proc = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        # Report the action only: the arguments may hold PINs.
        raise SoftHsmError(f"softhsm2-util {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class SoftHsmToken:
    module_path: str
    conf_path: pathlib.Path
    label: str
    serial: str
    slot_id: int            # SoftHSM2 derives it from the serial: stable across processes
    so_pin: str
    user_pin: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf_path)}


@pytest.fixture(scope="session")
def softhsm_module() -> str:
    try:
        return find_module()
    except ConfigurationError as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory, softhsm_module: str):
    """Path of this session's softhsm2.conf; SOFTHSM2_CONF points at it until the session ends."""
    conf = make_softhsm_dir(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        yield conf


@pytest.fixture
def softhsm_token(softhsm_conf: pathlib.Path, softhsm_module: str):
    """A new, empty token for this test (SoftHsmToken); its SO PIN is the tests' transport PUK
    for its serial, like a blank card's."""
    label = f"t-{uuid.uuid4().hex[:12]}"
    user_pin = "1234"
    serial = init_blank_token(softhsm_conf, label, user_pin)
    token = SoftHsmToken(module_path=softhsm_module, conf_path=softhsm_conf, label=label, serial=serial,
                         slot_id=token_slot_id(softhsm_conf, serial),
                         so_pin=transport_puk(serial), user_pin=user_pin)
    yield token
    with contextlib.suppress(SoftHsmError):     # the test may have deleted it already
        delete_token(softhsm_conf, serial)
