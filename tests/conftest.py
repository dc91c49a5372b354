"""Fixture plugins, one module per real component (see tests/support/), and the `hardware`
marker kept honest.

`pytest -m "not hardware"` must run without SoftHSM2, pcscd/vpcd or cardline processes, and
fast. So a test is marked `hardware` automatically when it uses a fixture that needs them
(HARDWARE_FIXTURES, followed through fixture dependencies), and a test that is NOT marked
fails at once if it starts such a process anyway (a `cardline` orchestrator or gateway, a
SoftHSM2 or OpenSC tool, pcscd) — mark it `@pytest.mark.hardware`.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.support.softhsm",     # private SoftHSM2 tokens
    "tests.support.pcsc",        # private pcscd + vpcd + card emulator
    "tests.support.store_ca",    # SQLite/PostgreSQL stores, local CA
    "tests.support.pki",         # the session's mTLS PKI (CA, orchestrator, admin, gateways)
]

#: Fixtures (tests/support/softhsm.py, tests/support/pcsc.py) that need SoftHSM2 or pcscd.
HARDWARE_FIXTURES = frozenset({"softhsm_module", "softhsm_conf", "softhsm_token", "pcscd", "restart_pcscd",
                               "vpcd_card_factory", "virtual_card"})
#: Programs a test that is not marked `hardware` must not start.
HARDWARE_PROGRAMS = frozenset({"cardline", "softhsm2-util", "pkcs11-tool", "pcscd",
                               "tests.support.faulty_orchestrator"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HARDWARE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.hardware)


def _program_names(args) -> set[str]:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    words = " ".join(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv).split()
    return {os.path.basename(w) for w in words}


class _HardwareFreePopen(subprocess.Popen):
    """subprocess.Popen for tests not marked `hardware`: refuses the programs above."""

    def __init__(self, args, *rest, **kwargs) -> None:
        started = _program_names(args) & HARDWARE_PROGRAMS
        if started:
            raise RuntimeError(f"this test starts {', '.join(sorted(started))} but is not marked "
                               "@pytest.mark.hardware (pytest -m 'not hardware' must need none of them)")
        super().__init__(args, *rest, **kwargs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _hardware_free(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _hardware_free(item):
        yield


class _hardware_free:
    def __init__(self, item: pytest.Item) -> None:
        self.active = item.get_closest_marker("hardware") is None
        self.saved = subprocess.Popen

    def __enter__(self) -> None:
        if self.active:
            subprocess.Popen = _HardwareFreePopen      # type: ignore[misc]

    def __exit__(self, *exc) -> None:
        subprocess.Popen = self.saved                  # type: ignore[misc]
