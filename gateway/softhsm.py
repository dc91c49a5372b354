"""SoftHSM2 software tokens for operators without hardware (`cardline tokens init`).

A token directory holds `tokens/` and the `softhsm2.conf` that points at it; a gateway (or
the orchestrator's CA key / KEK) sees its tokens when started with SOFTHSM2_CONF set to that
file. Tokens are initialised through PKCS#11 itself (C_InitToken, then C_InitPIN as SO) in
this process, so the PINs never appear on a command line.
"""
from __future__ import annotations

import os
import pathlib
import secrets
from dataclasses import dataclass

from shared.errors import AlreadyExists, CardIoError, ConfigurationError, ReaderNotFound
from shared.transport_puk import TransportPukRule

CONF_ENV = "SOFTHSM2_CONF"
MODULE_ENV = "SOFTHSM2_MODULE"
# Where Debian, Fedora and source builds put the module.
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


@dataclass(frozen=True)
class CreatedToken:
    label: str
    serial: str
    conf_path: pathlib.Path
    module_path: str


def find_module() -> str:
    """Path of libsofthsm2.so ($SOFTHSM2_MODULE first)."""
    for path in (os.environ.get(MODULE_ENV, ""), *MODULE_CANDIDATES):
        if path and os.path.exists(path):
            return path
    raise ConfigurationError(f"libsofthsm2.so not found (install softhsm2 or set {MODULE_ENV})")


def make_softhsm_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """Creates <path>/tokens and <path>/softhsm2.conf pointing at it (kept if it exists);
    returns the conf path."""
    root = pathlib.Path(path).resolve()
    (root / "tokens").mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = root / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {root / 'tokens'}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "slots.mechanisms = ALL\n"
            "library.reset_on_fork = false\n"
        )
    return conf


def init_token(directory: str | os.PathLike[str], label: str, so_pin: str | TransportPukRule, user_pin: str,
               module_path: str | None = None) -> CreatedToken:
    """Creates a token labelled `label` in the SoftHSM2 token directory (made if missing).

    `so_pin` is the SO PIN, or the transport PUK rule of a card series: the token then gets
    the PUK diversified for its serial (shared/transport_puk.py), like a blank card from a
    card bureau. SoftHSM2 chooses the serial in C_InitToken, so the token is initialised with
    a random SO PIN first, which is then changed to the derived PUK.

    SoftHSM2 reads SOFTHSM2_CONF when the module is initialised, so this sets it for this
    process and must run before anything else here loads the module."""
    import pkcs11

    from shared.pkcs11_module import Pkcs11Module

    first_so_pin = so_pin if isinstance(so_pin, str) else secrets.token_hex(16)
    for name, pin in (("SO PIN", first_so_pin), ("user PIN", user_pin)):
        if not pin:
            raise ConfigurationError(f"the {name} is empty")
    conf = make_softhsm_dir(directory)
    module_path = module_path or find_module()
    if Pkcs11Module.in_use(module_path):
        raise ConfigurationError(f"{module_path} is already loaded in this process; create tokens before "
                                 "loading it (SoftHSM2 reads its configuration only then)")
    os.environ[CONF_ENV] = str(conf)
    module = Pkcs11Module.acquire(module_path)

    def create() -> str:
        try:
            module.slot_of(label)
        except ReaderNotFound:
            pass
        else:
            raise AlreadyExists(f"a token labelled {label!r} is already in {conf.parent}", token_label=label)
        free = [slot.slot_id for slot in module.slots()
                if slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT
                and not slot.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
        if not free:
            raise CardIoError(f"SoftHSM2 offers no free slot in {conf.parent}")
        module.init_token(free[0], label, first_so_pin, user_pin)
        slot_id = module.slot_of(label)
        raw = module.token(slot_id).serial
        serial = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw).strip()
        if isinstance(so_pin, TransportPukRule):
            with module.role_session(slot_id, so_pin=first_so_pin) as session:
                session.set_pin(first_so_pin, so_pin.puk_for(serial))
        return str(serial)

    try:
        serial = module.thread.call(create)
    finally:
        module.release()
    return CreatedToken(label=label, serial=serial, conf_path=conf, module_path=module_path)
