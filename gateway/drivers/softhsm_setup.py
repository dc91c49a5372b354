"""Private SoftHSM2 token directories for tests and `make demo`.

SoftHSM2 reads SOFTHSM2_CONF (and scans its token directory) only when C_Initialize runs,
so tokens created here appear to a process that already loaded the module only after that
process finalises and initialises it again (Pkcs11TokenDriver.close() finalises).

These helpers drive `softhsm2-util` in a child process with SOFTHSM2_CONF set for that child
only; the PINs go on its command line, which is acceptable for test and demo tokens only.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

# Where Debian, Fedora and source builds put the module.
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHsmError(RuntimeError):
    pass


def find_module() -> str:
    """Path of libsofthsm2.so ($SOFTHSM2_MODULE first)."""
    for path in (os.environ.get("SOFTHSM2_MODULE", ""), *MODULE_CANDIDATES):
        if path and os.path.exists(path):
            return path
    raise SoftHsmError("libsofthsm2.so not found (install softhsm2 or set SOFTHSM2_MODULE)")


def make_softhsm_dir(path: str | os.PathLike) -> pathlib.Path:
    """Creates <path>/tokens and <path>/softhsm2.conf pointing at it; returns the conf path."""
    root = pathlib.Path(path).resolve()
    (root / "tokens").mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
        "library.reset_on_fork = false\n"
    )
    return conf


def init_token(conf_path: str | os.PathLike, label: str, so_pin: str, user_pin: str) -> str:
    """Initialises the first free token of that directory; returns its serial (hex text)."""
    if any(t["label"] == label for t in list_tokens(conf_path)):
        raise SoftHsmError(f"a token labelled {label!r} already exists in {conf_path}")
    _util(conf_path, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", user_pin)
    for token in list_tokens(conf_path):
        if token["label"] == label:
            return token["serial"]
    raise SoftHsmError(f"token {label!r} was initialised but softhsm2-util does not show it")


def token_slot_id(conf_path: str | os.PathLike, serial: str) -> int:
    """The slot id SoftHSM2 gives the token (derived from its serial, stable across restarts)."""
    for token in list_tokens(conf_path):
        if token["serial"] == serial:
            return token["slot_id"]
    raise SoftHsmError(f"no token with serial {serial} in {conf_path}")


def delete_token(conf_path: str | os.PathLike, serial: str) -> None:
    _util(conf_path, "--delete-token", "--serial", serial)


def list_tokens(conf_path: str | os.PathLike) -> list[dict]:
    """Initialised tokens as softhsm2-util shows them: [{slot_id, serial, label}]."""
    out = _util(conf_path, "--show-slots")
    tokens = []
    # One block per slot: "Slot <n>" then indented info lines.
    for block in re.split(r"^Slot (?=\d+\s*$)", out, flags=re.M)[1:]:
        slot_id = int(block.split(None, 1)[0])
        fields = dict(re.findall(r"^\s+(Serial number|Label|Initialized):\s*(.*?)\s*$", block, flags=re.M))
        if fields.get("Initialized") == "yes":
            tokens.append({"slot_id": slot_id, "serial": fields.get("Serial number", ""),
                           "label": fields.get("Label", "")})
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
