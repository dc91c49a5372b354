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
"""
from __future__ import annotations

import os
import pathlib
import uuid
from dataclasses import dataclass

import pytest

from gateway.drivers import softhsm_setup


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
        return softhsm_setup.find_module()
    except softhsm_setup.SoftHsmError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory, softhsm_module: str):
    """Path of this session's softhsm2.conf; SOFTHSM2_CONF points at it until the session ends."""
    conf = softhsm_setup.make_softhsm_dir(tmp_path_factory.mktemp("softhsm"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        yield conf


@pytest.fixture
def softhsm_token(softhsm_conf: pathlib.Path, softhsm_module: str):
    """A new, empty token for this test (SoftHsmToken)."""
    label = f"t-{uuid.uuid4().hex[:12]}"
    so_pin, user_pin = "12345678", "1234"
    serial = softhsm_setup.init_token(softhsm_conf, label, so_pin, user_pin)
    token = SoftHsmToken(module_path=softhsm_module, conf_path=softhsm_conf, label=label, serial=serial,
                         slot_id=softhsm_setup.token_slot_id(softhsm_conf, serial),
                         so_pin=so_pin, user_pin=user_pin)
    yield token
    try:
        softhsm_setup.delete_token(softhsm_conf, serial)
    except softhsm_setup.SoftHsmError:
        pass    # the test may have deleted it already
