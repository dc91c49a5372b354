"""One owner per loaded PKCS#11 module in this process: its thread, its sessions, its logins,
and the one translation of PKCS#11 failures into cardline errors.

Why one owner: python-pkcs11 initialises a module as single-threaded (C_Initialize(NULL)),
so SoftHSM2 turns its own locking off and two threads inside one module crash the process;
and PKCS#11 login belongs to the process (a second C_Login on a token raises
UserAlreadyLoggedIn). So every user of a module in a process - the gateway's token driver,
the CA key on a token, the key-encryption key - acquires the same Pkcs11Module
(`Pkcs11Module.acquire(path)`), runs its token calls on the module's one thread
(`module.thread.call(fn)`), and logs in through it (`module.login(slot_id, pin)`), which keeps
one logged-in session per slot. The last release() logs out and finalises the module, so a
later acquire() initialises it again (SoftHSM2 then re-reads its token directory).

Sessions: `login(slot_id, pin)` reuses the slot's session while the same PIN comes back; a
different PIN logs out and in again, so a wrong PIN is always refused by the token itself.
The cache keeps an HMAC of the PIN under a random per-process key, never the PIN. A cached
session is dropped on a PKCS#11 error (`drop`), when the slot's token changes serial, and on
the last release.

For parallelism, run modules in several processes, not threads.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import hashlib
import hmac
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import pkcs11
import pkcs11.exceptions as p11err
from pkcs11 import TokenFlag

from shared.errors import (
    CardIoError,
    CardlineError,
    ConfigurationError,
    NoCardPresent,
    PinIncorrect,
    PinLocked,
    ReaderNotFound,
)

T = TypeVar("T")

# The token says the card or its session is gone.
GONE = (p11err.TokenNotPresent, p11err.TokenNotRecognised, p11err.DeviceRemoved)
SESSION_LOST = (*GONE, p11err.SessionClosed, p11err.SessionHandleInvalid)
# A long-lived user (CA key, KEK) logs in again once after these (token restarted, re-inserted).
RECONNECT = (*SESSION_LOST, p11err.ObjectHandleInvalid, p11err.UserNotLoggedIn)
BAD_PIN = (p11err.PinIncorrect, p11err.PinLenRange, p11err.PinInvalid)
# The token refused to create, change or destroy an object.
REFUSED_WRITE = (p11err.TokenWriteProtected, p11err.SessionReadOnly, p11err.DeviceMemory,
                 p11err.TemplateInconsistent, p11err.TemplateIncomplete, p11err.AttributeValueInvalid,
                 p11err.AttributeReadOnly, p11err.FunctionRejected)

_thread_numbers = itertools.count()


def cardline_error(exc: p11err.PKCS11Error, where: str, **metadata: str) -> CardlineError:
    """The cardline error for a PKCS#11 failure at `where` ("slot 3", "token 'ca'", "module
    softhsm2") - the one mapping every user of a module shares."""
    name = type(exc).__name__
    if isinstance(exc, SESSION_LOST):
        return NoCardPresent(f"{where}: the token or its session is gone ({name})", **metadata)
    if isinstance(exc, p11err.PinLocked):
        return PinLocked(f"{where}: the PIN is blocked", **metadata)
    if isinstance(exc, BAD_PIN):
        return PinIncorrect(f"{where}: the PIN was refused", **metadata)
    if isinstance(exc, (p11err.UserAlreadyLoggedIn, p11err.AnotherUserAlreadyLoggedIn)):
        # Someone else in this process holds a login we do not know about; we cannot check
        # the PIN against it, so refuse rather than ride on it.
        return CardIoError(f"{where}: the token is already logged in by another session of this process",
                           **metadata)
    return CardIoError(f"{where}: PKCS#11 error {name}", **metadata)


@contextlib.contextmanager
def translated(where: str, **metadata: str) -> Iterator[None]:
    """Runs a block whose PKCS#11 failures become cardline errors (cardline_error)."""
    try:
        yield
    except p11err.PKCS11Error as exc:
        raise cardline_error(exc, where, **metadata) from exc


def module_short_name(module_path: str) -> str:
    """'/usr/lib/softhsm/libsofthsm2.so' -> 'softhsm2'; 'opensc-pkcs11.so' -> 'opensc-pkcs11'."""
    name = os.path.basename(module_path).split(".so")[0]
    return name.removeprefix("lib") or name


class OwnerThread:
    """One dedicated thread that runs the calls given to it, in arrival order. A call made on
    the thread itself runs directly (no deadlock when owner code calls owner code)."""

    def __init__(self, name: str = "") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"pkcs11-{name or next(_thread_numbers)}")
        self._ident = self._executor.submit(threading.get_ident).result()
        self._closed = False

    @property
    def ident(self) -> int:
        return self._ident

    def on_it(self) -> bool:
        return threading.get_ident() == self._ident

    def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the thread and returns its result (blocks the caller)."""
        if self.on_it():
            return fn()
        return self._submit(fn).result()

    async def call_async(self, fn: Callable[[], T]) -> T:
        """Same as call() for asyncio callers: the event loop is not blocked."""
        if self.on_it():
            return fn()
        return await asyncio.wrap_future(self._submit(fn))

    def close(self) -> None:
        """Stops the thread after the calls already queued."""
        self._closed = True
        self._executor.shutdown(wait=not self.on_it())

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        if self._closed:
            raise CardIoError("the PKCS#11 module's thread is closed")
        try:
            return self._executor.submit(fn)
        except RuntimeError as exc:     # shut down by a concurrent close()
            raise CardIoError("the PKCS#11 module's thread is closed") from exc


@dataclass
class _CachedSession:
    session: Any            # pkcs11.Session, logged in
    token_serial: bytes
    pin_tag: bytes          # HMAC of the PIN under the module's per-process key


class Pkcs11Module:
    """A loaded PKCS#11 module, shared by every user in this process. Get it with acquire(),
    give it back with release(); everything but acquire/release/thread runs on `thread`."""

    _owners: ClassVar[dict[str, Pkcs11Module]] = {}
    _owners_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.short_name = module_short_name(path)
        self.thread = OwnerThread(self.short_name)
        self._users = 0
        self._sessions: dict[int, _CachedSession] = {}
        self._pin_key = os.urandom(32)
        self._get_token_info: Any = None    # C_GetTokenInfo through ctypes; False: not available
        try:
            self._lib = self.thread.call(self._load)
        except BaseException:
            self.thread.close()
            raise

    @classmethod
    def acquire(cls, module_path: str) -> Pkcs11Module:
        """This process's owner of the module (loaded and initialised on first use)."""
        path = os.path.realpath(module_path)
        with cls._owners_lock:
            module = cls._owners.get(path)
            if module is None:
                module = cls._owners[path] = cls(path)
            module._users += 1
            return module

    @classmethod
    def in_use(cls, module_path: str) -> bool:
        """Whether this process holds the module now."""
        with cls._owners_lock:
            return os.path.realpath(module_path) in cls._owners

    def release(self) -> None:
        """Gives the module back; the last user's release logs out and finalises it."""
        # Under the lock: a concurrent acquire() must not find the module initialised and
        # then have it finalised under its feet.
        with self._owners_lock:
            self._users -= 1
            if self._users > 0:
                return
            del self._owners[self.path]
            try:
                self.thread.call(self._shutdown)
            finally:
                self.thread.close()

    def _load(self) -> Any:
        try:
            # python-pkcs11 keeps one lib per path and initialises it again after a finalize.
            return pkcs11.lib(self.path)
        except p11err.PKCS11Error as exc:
            raise ConfigurationError(f"cannot load PKCS#11 module {self.path}: {exc}", module=self.path) from exc

    def _shutdown(self) -> None:
        for slot_id in list(self._sessions):
            self.drop(slot_id)
        with contextlib.suppress(p11err.PKCS11Error):
            self._lib.finalize()

    # --- on the owner thread ----------------------------------------------------------------

    def slots(self) -> list[Any]:
        with translated(f"module {self.short_name}"):
            return list(self._lib.get_slots())

    def token(self, slot_id: int) -> Any:
        """The token in the slot; ReaderNotFound / NoCardPresent / CardIoError otherwise."""
        slot = next((s for s in self.slots() if s.slot_id == slot_id), None)
        if slot is None:
            self.drop(slot_id)
            raise ReaderNotFound(f"no slot {slot_id} in {self.short_name}", slot_id=str(slot_id))
        try:
            return slot.get_token()
        except p11err.PKCS11Error as exc:
            self.drop(slot_id)
            # SoftHSM2 answers GeneralError for a token deleted under a live process.
            raise cardline_error(exc, f"slot {slot_id}", slot_id=str(slot_id)) from exc

    def slot_of(self, token_label: str) -> int:
        """The slot holding the token labelled token_label; ReaderNotFound if none, or several."""
        found = []
        for slot in self.slots():
            with contextlib.suppress(p11err.PKCS11Error):
                if slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT and \
                        slot.get_token().label.strip() == token_label:
                    found.append(slot.slot_id)
        if len(found) != 1:
            what = "no PKCS#11 token" if not found else f"{len(found)} PKCS#11 tokens"
            raise ReaderNotFound(f"{what} labelled {token_label!r} in {self.path}", token_label=token_label)
        return int(found[0])

    def login(self, slot_id: int, pin: str) -> Any:
        """A session logged in as user on the slot's token (R/W where the token allows),
        reused while the same PIN and token come back."""
        token = self.token(slot_id)
        tag = hmac.new(self._pin_key, pin.encode(), hashlib.sha256).digest()
        cached = self._sessions.get(slot_id)
        if cached is not None:
            if cached.token_serial == token.serial and hmac.compare_digest(cached.pin_tag, tag):
                return cached.session
            self.drop(slot_id)     # other token or other PIN: log out, then in again
        where = f"slot {slot_id}"
        if token.flags & TokenFlag.USER_PIN_LOCKED:
            raise PinLocked(f"the user PIN of the token in {where} is blocked", slot_id=str(slot_id))
        try:
            session = _open(token, user_pin=pin)
        except BAD_PIN as exc:
            raise self.pin_error(slot_id) from exc
        except p11err.PKCS11Error as exc:
            raise cardline_error(exc, where, slot_id=str(slot_id)) from exc
        self._sessions[slot_id] = _CachedSession(session, token.serial, tag)
        return session

    @contextlib.contextmanager
    def role_session(self, slot_id: int, *, user_pin: str | None = None,
                     so_pin: str | None = None) -> Iterator[Any]:
        """A short R/W session logged in as user or SO (PIN management), closed - and so logged
        out - on exit; the slot's cached session is dropped first (user and SO cannot both be
        logged in)."""
        self.drop(slot_id)
        token = self.token(slot_id)
        where = f"slot {slot_id}"
        try:
            session = token.open(rw=True, user_pin=user_pin, so_pin=so_pin)
        except BAD_PIN as exc:
            raise self.pin_error(slot_id, so=so_pin is not None) from exc
        except p11err.PKCS11Error as exc:
            raise cardline_error(exc, where, slot_id=str(slot_id)) from exc
        try:
            yield session
        finally:
            with contextlib.suppress(p11err.PKCS11Error):
                session.close()

    def pin_error(self, slot_id: int, so: bool = False) -> CardlineError:
        """PinIncorrect / PinLocked after a refused PIN. PKCS#11 reveals retries only as
        flags: 'final try' means one left."""
        try:
            flags = self.token(slot_id).flags
        except CardlineError:
            flags = TokenFlag(0)
        role, locked, final = (("SO", TokenFlag.SO_PIN_LOCKED, TokenFlag.SO_PIN_FINAL_TRY) if so else
                               ("user", TokenFlag.USER_PIN_LOCKED, TokenFlag.USER_PIN_FINAL_TRY))
        where = f"the token in slot {slot_id}"
        if flags & locked:
            return PinLocked(f"the {role} PIN of {where} is now blocked", slot_id=str(slot_id))
        if flags & final:
            return PinIncorrect(f"the {role} PIN for {where} was refused", slot_id=str(slot_id),
                                attempts_remaining=1)
        return PinIncorrect(f"the {role} PIN for {where} was refused", slot_id=str(slot_id))

    def drop(self, slot_id: int) -> None:
        """Closes the slot's cached session (which logs out when it was the last one)."""
        cached = self._sessions.pop(slot_id, None)
        if cached is not None:
            # The session may already be dead (token removed); closing is best effort.
            with contextlib.suppress(p11err.PKCS11Error):
                cached.session.close()

    def pin_limits(self, slot_id: int) -> tuple[int, int] | None:
        """(ulMinPinLen, ulMaxPinLen) of the slot's token, or None if they cannot be read.

        python-pkcs11 0.10 keeps only some CK_TOKEN_INFO fields, so this asks the module
        itself through its C_GetFunctionList (the module is already initialised in this
        process; dlopen hands back the same loaded copy)."""
        if self._get_token_info is None:
            self._get_token_info = _module_function(self.path, "C_GetTokenInfo") or False
        if not self._get_token_info:
            return None
        info = _CkTokenInfo()
        if self._get_token_info(slot_id, ctypes.byref(info)) != 0:      # CKR_OK
            return None
        low, high = int(info.ulMinPinLen), int(info.ulMaxPinLen)
        if high == 0 or high < low or high >= 1 << 31:   # unknown / CK_UNAVAILABLE_INFORMATION
            return None
        return low, high

    def init_token(self, slot_id: int, label: str, so_pin: str, user_pin: str) -> None:
        """Initialises the token in the slot (C_InitToken: erases it, sets label and SO PIN),
        then sets its user PIN (C_InitPIN as SO). python-pkcs11 0.10 has no C_InitToken, so
        it is called through the module's function list, like C_GetTokenInfo."""
        raw_label = label.encode()
        if not label or len(raw_label) > 32:
            raise ConfigurationError("a token label has 1 to 32 bytes", token_label=label)
        init = _module_function(self.path, "C_InitToken")
        if init is None:
            raise ConfigurationError(f"cannot reach C_InitToken of {self.path}", module=self.path)
        self.drop(slot_id)
        pin = so_pin.encode()
        rv = init(slot_id, pin, len(pin), raw_label.ljust(32, b" "))
        if rv != 0:
            exc = p11err.PKCS11Error(f"C_InitToken returned 0x{rv:x}")
            if rv in (0xA0, 0xA1, 0xA2):    # CKR_PIN_INCORRECT, CKR_PIN_INVALID, CKR_PIN_LEN_RANGE
                exc = p11err.PinLenRange()
            raise cardline_error(exc, f"slot {slot_id}", slot_id=str(slot_id))
        new_slot = self.slot_of(label)
        with self.role_session(new_slot, so_pin=so_pin) as session, translated(f"slot {new_slot}"):
            session.init_pin(user_pin)


def _open(token: Any, user_pin: str) -> Any:
    try:
        return token.open(rw=True, user_pin=user_pin)
    except p11err.TokenWriteProtected:
        # Read-only tokens still sign; writes then fail as SessionReadOnly.
        return token.open(rw=False, user_pin=user_pin)


class TokenLogin:
    """A long-lived user's login to the token labelled `token_label` (the CA key, the KEK).

    run(fn) calls fn on the module's thread with the logged-in session; when the session was
    lost (token restarted or re-inserted), it logs in again once and calls `on_new_session`
    first, so the user can find its key objects again. Failures are cardline errors
    (cardline_error). The PIN stays in this object's memory only, to log in again.
    """

    def __init__(self, module: Pkcs11Module, token_label: str, pin: str,
                 on_new_session: Callable[[Any], None]) -> None:
        self.module = module
        self.token_label = token_label
        self._pin = pin
        self._on_new_session = on_new_session
        self._slot_id: int | None = None
        self._session: Any = None

    def run(self, fn: Callable[[Any], T]) -> T:
        return self.module.thread.call(lambda: self._run(fn))

    def forget_pin(self) -> None:
        self._pin = ""

    def _run(self, fn: Callable[[Any], T]) -> T:
        where = f"token {self.token_label!r}"
        for attempt in (1, 2):
            session = self._logged_in()
            try:
                return fn(session)
            except RECONNECT as exc:
                self._lost()
                if attempt == 2:
                    raise cardline_error(exc, where, token_label=self.token_label) from exc
            except p11err.PKCS11Error as exc:
                raise cardline_error(exc, where, token_label=self.token_label) from exc
        raise AssertionError("unreachable")

    def _logged_in(self) -> Any:
        if not self._pin:
            raise CardIoError(f"the login to token {self.token_label!r} is closed", token_label=self.token_label)
        if self._slot_id is None:
            self._slot_id = self.module.slot_of(self.token_label)
        session = self.module.login(self._slot_id, self._pin)
        if session is not self._session:
            self._session = session
            try:
                self._on_new_session(session)
            except BaseException:
                self._session = None
                raise
        return session

    def _lost(self) -> None:
        if self._slot_id is not None:
            self.module.drop(self._slot_id)
        self._slot_id, self._session = None, None


# --- C_GetTokenInfo and C_InitToken through ctypes -------------------------------------------------------------

class _CkTokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO with the default (non-Windows) structure packing."""
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                ("flags", ctypes.c_ulong), ("ulMaxSessionCount", ctypes.c_ulong),
                ("ulSessionCount", ctypes.c_ulong), ("ulMaxRwSessionCount", ctypes.c_ulong),
                ("ulRwSessionCount", ctypes.c_ulong), ("ulMaxPinLen", ctypes.c_ulong),
                ("ulMinPinLen", ctypes.c_ulong), ("ulTotalPublicMemory", ctypes.c_ulong),
                ("ulFreePublicMemory", ctypes.c_ulong), ("ulTotalPrivateMemory", ctypes.c_ulong),
                ("ulFreePrivateMemory", ctypes.c_ulong), ("hardwareVersion", ctypes.c_ubyte * 2),
                ("firmwareVersion", ctypes.c_ubyte * 2), ("utcTime", ctypes.c_char * 16)]


_C_GetTokenInfo = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_CkTokenInfo))
# C_InitToken(slot, SO PIN, SO PIN length, 32-byte blank-padded label)
_C_InitToken = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


class _CkFunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST, up to C_InitToken (same order in every version)."""
    _fields_ = [("version", ctypes.c_ubyte * 2), ("C_Initialize", ctypes.c_void_p),
                ("C_Finalize", ctypes.c_void_p), ("C_GetInfo", ctypes.c_void_p),
                ("C_GetFunctionList", ctypes.c_void_p), ("C_GetSlotList", ctypes.c_void_p),
                ("C_GetSlotInfo", ctypes.c_void_p), ("C_GetTokenInfo", _C_GetTokenInfo),
                ("C_GetMechanismList", ctypes.c_void_p), ("C_GetMechanismInfo", ctypes.c_void_p),
                ("C_InitToken", _C_InitToken)]


def _module_function(module_path: str, name: str) -> Any:
    """A function of the module's CK_FUNCTION_LIST python-pkcs11 does not offer, or None
    where it cannot be had safely."""
    if os.name == "nt":     # PKCS#11 structures are packed to 1 byte there
        return None
    try:
        module = ctypes.CDLL(module_path)
        get_list = module.C_GetFunctionList
        get_list.restype = ctypes.c_ulong
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead))]
        funcs = ctypes.POINTER(_CkFunctionListHead)()
        if get_list(ctypes.byref(funcs)) != 0 or not funcs:
            return None
        function = getattr(funcs.contents, name)
        return function if function else None
    except (OSError, AttributeError, ValueError):
        return None
