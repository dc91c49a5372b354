"""TokenWorker: every driver call, and the driver's construction, on one dedicated thread."""
from __future__ import annotations

import asyncio
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.token_worker import TokenWorker
from gateway.drivers.base import KeyType, SignatureAlgorithm
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from shared.errors import ConfigurationError, PinIncorrect


class RecordingDriver:
    """Stands in for a driver; remembers which thread ran what."""

    def __init__(self) -> None:
        self.threads = {"__init__": threading.get_ident()}
        self.closed = False

    def list_tokens(self):
        self.threads["list_tokens"] = threading.get_ident()
        return ["token"]

    def sign(self, slot_id, pin, key_id, algorithm, data):
        self.threads["sign"] = threading.get_ident()
        if pin != "1234":
            raise PinIncorrect("wrong user PIN")
        return b"sig:" + data

    def close(self) -> None:
        self.threads["close"] = threading.get_ident()
        self.closed = True


def test_driver_is_built_used_and_closed_on_one_thread_that_is_not_the_callers():
    made: list[RecordingDriver] = []
    worker = TokenWorker(lambda: made.append(RecordingDriver()) or made[-1])
    assert worker.call_sync("list_tokens") == ["token"]
    assert asyncio.run(worker.call("sign", 1, "1234", b"k", None, b"x")) == b"sig:x"
    worker.close()
    threads = set(made[0].threads.values())
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert set(made[0].threads) == {"__init__", "list_tokens", "sign", "close"}
    assert made[0].closed


def test_driver_errors_reach_the_caller_unchanged():
    worker = TokenWorker(RecordingDriver)
    with pytest.raises(PinIncorrect):
        asyncio.run(worker.call("sign", 1, "0000", b"k", None, b"x"))
    with pytest.raises(PinIncorrect):
        worker.call_sync("sign", 1, "0000", b"k", None, b"x")
    worker.close()


def test_a_factory_error_is_raised_by_calls_and_close_still_works():
    def broken():
        raise ConfigurationError("cannot load module")
    worker = TokenWorker(broken)
    with pytest.raises(ConfigurationError):
        worker.call_sync("list_tokens")
    worker.close()


def test_private_methods_and_calls_after_close_are_refused():
    worker = TokenWorker(RecordingDriver)
    with pytest.raises(ValueError):
        worker.call_sync("_secret")
    worker.close()
    with pytest.raises(RuntimeError):
        worker.call_sync("list_tokens")


# --- with the real PKCS#11 driver on SoftHSM2 ------------------------------------------------

class ThreadCheckingDriver(Pkcs11TokenDriver):
    """The real driver, noting the thread of construction and of every public call."""

    def __init__(self, module_path: str) -> None:
        self.threads = {threading.get_ident()}
        super().__init__(module_path)

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if not name.startswith("_") and callable(attr):
            object.__getattribute__(self, "threads").add(threading.get_ident())
        return attr


@pytest.mark.hardware
def test_real_driver_runs_every_call_on_the_worker_thread(softhsm_token):
    tok = softhsm_token
    made: list[ThreadCheckingDriver] = []
    worker = TokenWorker(lambda: made.append(ThreadCheckingDriver(tok.module_path)) or made[-1])
    try:
        worker.call_sync("list_tokens")
        worker.call_sync("generate_key_pair", tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
        asyncio.run(worker.call("sign", tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m"))
        assert made[0].threads == {worker.driver_thread_ident()}
        assert threading.get_ident() not in made[0].threads
    finally:
        worker.close()


@pytest.mark.hardware
def test_many_concurrent_async_calls_through_the_worker_all_succeed(softhsm_token):
    tok = softhsm_token
    worker = TokenWorker(lambda: Pkcs11TokenDriver(tok.module_path))

    async def scenario():
        gen = await worker.call("generate_key_pair", tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
        public = serialization.load_der_public_key(gen.public_key_der)
        messages = [f"message {i}".encode() for i in range(100)]
        # Interleaved: signatures, listings and wrong-PIN calls (each of which logs out).
        calls = []
        for i, m in enumerate(messages):
            calls.append(worker.call("sign", tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, m))
            if i % 5 == 0:
                calls.append(worker.call("list_objects", tok.slot_id, tok.user_pin))
            if i % 20 == 10:
                calls.append(worker.call("list_objects", tok.slot_id, "000000"))
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
        worker.close()
