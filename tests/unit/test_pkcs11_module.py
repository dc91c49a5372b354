"""shared.pkcs11_module: one owner thread per PKCS#11 module, one login per token, one
mapping of PKCS#11 errors to cardline errors."""
from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable

import pkcs11.exceptions as p11err
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.drivers.base import KeyType, SignatureAlgorithm
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from shared.errors import CardIoError, ConfigurationError, NoCardPresent, PinIncorrect, PinLocked
from shared.pkcs11_module import OwnerThread, Pkcs11Module, cardline_error


def test_owner_thread_runs_calls_on_one_thread_that_is_not_the_callers():
    owner = OwnerThread("test")
    try:
        seen = {owner.call(threading.get_ident), asyncio.run(owner.call_async(threading.get_ident))}
        assert seen == {owner.ident} and threading.get_ident() not in seen
        # A call made on the owner thread itself runs there directly instead of deadlocking.
        assert owner.call(lambda: owner.call(threading.get_ident)) == owner.ident
    finally:
        owner.close()


def test_owner_thread_passes_errors_unchanged_and_refuses_calls_after_close():
    owner = OwnerThread("test")

    def refuse() -> None:
        raise PinIncorrect("the user PIN was refused")
    with pytest.raises(PinIncorrect):
        owner.call(refuse)
    with pytest.raises(PinIncorrect):
        asyncio.run(owner.call_async(refuse))
    owner.close()
    with pytest.raises(CardIoError, match="closed"):
        owner.call(threading.get_ident)


@pytest.mark.parametrize(("pkcs11_error", "cardline_class"), [
    (p11err.TokenNotPresent, NoCardPresent), (p11err.DeviceRemoved, NoCardPresent),
    (p11err.SessionHandleInvalid, NoCardPresent), (p11err.PinLocked, PinLocked),
    (p11err.PinIncorrect, PinIncorrect), (p11err.UserAlreadyLoggedIn, CardIoError),
    (p11err.GeneralError, CardIoError),
])
def test_one_mapping_of_pkcs11_errors_to_cardline_errors(pkcs11_error, cardline_class):
    err = cardline_error(pkcs11_error(), "slot 3", slot_id="3")
    assert type(err) is cardline_class
    assert "slot 3" in err.message and err.metadata == {"slot_id": "3"}


def test_a_module_that_cannot_be_loaded_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot load PKCS#11 module"):
        Pkcs11Module.acquire(str(tmp_path / "no-such-module.so"))


# --- with the real PKCS#11 driver on SoftHSM2 ------------------------------------------------

@pytest.mark.hardware
def test_one_owner_per_module_users_share_it_and_the_last_release_finalises(softhsm_token):
    tok = softhsm_token
    first = Pkcs11Module.acquire(tok.module_path)
    second = Pkcs11Module.acquire(tok.module_path)
    try:
        assert first is second
        session = first.thread.call(lambda: first.login(tok.slot_id, tok.user_pin))
        # Same PIN: the login is shared, not repeated (a second C_Login would be refused).
        assert second.thread.call(lambda: second.login(tok.slot_id, tok.user_pin)) is session
    finally:
        second.release()
    assert first.thread.call(lambda: first.login(tok.slot_id, tok.user_pin)) is session   # still held
    first.release()
    third = Pkcs11Module.acquire(tok.module_path)
    try:
        assert third is not first       # initialised afresh
    finally:
        third.release()


@pytest.mark.hardware
def test_real_driver_runs_every_call_on_its_module_thread(softhsm_token):
    tok = softhsm_token
    driver = Pkcs11TokenDriver(tok.module_path)
    threads: set[int] = set()
    original_login = Pkcs11Module.login

    def recording_login(module, slot_id, pin):
        threads.add(threading.get_ident())
        return original_login(module, slot_id, pin)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Pkcs11Module, "login", recording_login)
            driver.list_tokens()
            driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
            asyncio.run(driver.thread.call_async(
                lambda: driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")))
        assert threads == {driver.thread.ident}
        assert threading.get_ident() not in threads
    finally:
        driver.close()


@pytest.mark.hardware
def test_many_concurrent_async_calls_through_the_module_thread_all_succeed(softhsm_token):
    tok = softhsm_token
    driver = Pkcs11TokenDriver(tok.module_path)
    call = driver.thread.call_async

    async def scenario():
        gen = await call(lambda: driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01"))
        public = serialization.load_der_public_key(gen.public_key_der)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        messages = [f"message {i}".encode() for i in range(100)]
        # Interleaved: signatures, listings and wrong-PIN calls (each of which logs out).
        calls: list[Awaitable[object]] = []
        for i, m in enumerate(messages):
            calls.append(call(functools.partial(driver.sign, tok.slot_id, tok.user_pin, b"\x01",
                                                SignatureAlgorithm.ECDSA_SHA256, m)))
            if i % 5 == 0:
                calls.append(call(lambda: driver.list_objects(tok.slot_id, tok.user_pin)))
            if i % 20 == 10:
                calls.append(call(lambda: driver.list_objects(tok.slot_id, "000000")))
        results = await asyncio.gather(*calls, return_exceptions=True)
        sigs = [r for r in results if isinstance(r, bytes)]
        lists = [r for r in results if isinstance(r, list)]
        errors = [r for r in results if isinstance(r, BaseException)]
        for message, sig in zip(messages, sigs, strict=True):
            public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        assert len(lists) == 20 and all(len(objs) == 2 for objs in lists)
        assert len(errors) == 5 and all(isinstance(e, PinIncorrect) for e in errors)

    try:
        asyncio.run(scenario())
    finally:
        driver.close()
