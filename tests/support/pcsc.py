"""pytest fixtures for PC/SC: a private pcscd with the vpcd driver and emulated cards.

Fixtures:
  pcscd            (session) PcscdHandle of a private pcscd (two vpcd slots, ports chosen
                   here; slot i on handle.base_port + i). PCSCLITE_CSOCK_NAME is set in
                   os.environ at pytest_configure, before any test can make a PC/SC
                   context. Skips when the machine cannot run it (not root, vpcd missing).
  restart_pcscd    function () -> PcscdHandle: stops that pcscd and starts a new process on
                   the same socket and ports (the session handle is updated in place).
  virtual_card     VirtualCard(card=VpcdCard, reader=reader name, reader_id="pcsc:...")
                   for slot 0, inserted and seen present by pcscd; removed afterwards.
  vpcd_card_factory  function (slot=0, insert=True) -> VpcdCard, each removed afterwards;
                   for tests that need the second slot or an empty reader.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import pytest

from tests.support import pcsc_rig
from tests.support.vpcd_card import VpcdCard


@dataclass
class VirtualCard:
    card: VpcdCard
    reader: str

    @property
    def reader_id(self) -> str:
        return "pcsc:" + self.reader


def wait_card_state(reader: str, present: bool, timeout_s: float = 5.0) -> None:
    """Block until pcscd reports the card in ``reader`` present (or absent)."""
    from smartcard import scard
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hresult == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hresult)
    try:
        deadline = time.monotonic() + timeout_s
        state = scard.SCARD_STATE_UNAWARE
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            hresult, states = scard.SCardGetStatusChange(context, max(remaining, 0),
                                                         [(reader, state)])
            if hresult == scard.SCARD_S_SUCCESS:
                state = states[0][1] & ~scard.SCARD_STATE_CHANGED
                if bool(state & scard.SCARD_STATE_PRESENT) == present:
                    return
            elif hresult != scard.SCARD_E_TIMEOUT:
                time.sleep(0.05)        # reader not there yet (pcscd just started)
                state = scard.SCARD_STATE_UNAWARE
            if remaining <= 0:
                raise TimeoutError(f"card in {reader!r} not {'present' if present else 'absent'}")
    finally:
        scard.SCardReleaseContext(context)


_WORKDIR: str | None = None


def pytest_configure(config):
    # libpcsclite reads PCSCLITE_CSOCK_NAME once, at the first context of the process, so
    # point it at our private pcscd's future socket before any test can make one. This
    # also keeps every test away from the system pcscd and any real cards.
    global _WORKDIR
    _WORKDIR = tempfile.mkdtemp(prefix="cardline-pcscd-")
    os.environ["PCSCLITE_CSOCK_NAME"] = os.path.join(_WORKDIR, "run", "pcscd.comm")


def pytest_unconfigure(config):
    if _WORKDIR:
        shutil.rmtree(_WORKDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def pcscd():
    reason = pcsc_rig.unavailable_reason()
    if reason:
        pytest.skip(f"private pcscd unavailable: {reason}")
    assert _WORKDIR is not None  # pytest_configure made it
    handle = pcsc_rig.start_pcscd(_WORKDIR, pcsc_rig.free_base_port(),
                                  debug=bool(os.environ.get("CARDLINE_PCSCD_DEBUG")))
    os.environ.update(handle.env)      # the same file (resolve() may canonicalise the path)
    try:
        for slot in range(pcsc_rig.VPCD_SLOTS):
            pcsc_rig.wait_vpcd_listening(handle, slot)
        yield handle
    finally:
        pcsc_rig.stop_pcscd(handle)


@pytest.fixture
def restart_pcscd(pcscd):
    def restart() -> pcsc_rig.PcscdHandle:
        new = pcsc_rig.restart_pcscd(pcscd, debug=bool(os.environ.get("CARDLINE_PCSCD_DEBUG")))
        pcscd.pid, pcscd.process = new.pid, new.process     # the session handle follows
        for slot in range(pcsc_rig.VPCD_SLOTS):
            pcsc_rig.wait_vpcd_listening(pcscd, slot)
        return pcscd
    return restart


@pytest.fixture
def vpcd_card_factory(pcscd):
    made: list[VpcdCard] = []

    def make(slot: int = 0, insert: bool = True) -> VpcdCard:
        card = VpcdCard(pcscd.slot_port(slot))
        made.append(card)
        if insert:
            card.insert()
            wait_card_state(pcscd.reader_name(slot), present=True)
        return card

    yield make
    for card in made:
        card.remove()
    # Leave the slots empty for the next test (removal is seen ~300 ms later).
    for slot in range(pcsc_rig.VPCD_SLOTS):
        with contextlib.suppress(TimeoutError, AssertionError):
            wait_card_state(pcscd.reader_name(slot), present=False)


@pytest.fixture
def virtual_card(pcscd, vpcd_card_factory) -> VirtualCard:
    return VirtualCard(card=vpcd_card_factory(0), reader=pcscd.reader_name(0))
