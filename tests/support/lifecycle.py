"""Helpers of the lifecycle tests (docs/lifecycle.md): the shipped example processes pointed
at a test's readers, PIN checks in a child process, CRLs read with `openssl crl -text`, the CLI."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from tests.support.pki import default_pki
from tests.support.processes import CARDLINE

EXAMPLE_READER = "reader: {site: hq, kind: pkcs11}"


def reader_line(token_or_serial) -> str:
    serial = getattr(token_or_serial, "serial", token_or_serial)
    return f'reader: {{reader: "pkcs11:softhsm2:{serial}"}}'


def use_reader(config: pathlib.Path, process: str, token_or_serial) -> None:
    """Points the example process at one token's reader (the pool holds several cards)."""
    path = config / "processes" / f"{process}.yaml"
    text = path.read_text()
    assert EXAMPLE_READER in text, f"{process}: no example reader line to replace"
    path.write_text(text.replace(EXAMPLE_READER, reader_line(token_or_serial)))


PUK_CARD_TEMPLATE = """
  - name: EmployeeCardWithPuk
    state_graph: EmployeeCard
    encoding: employee-card-with-puk
    transport_puk_key_file: transport-puk.key
    produced_state: Active
    failed_state: ProductionFailed
"""


def add_puk_card_template(config: pathlib.Path) -> None:
    """Card template EmployeeCardWithPuk (encoding employee-card-with-puk, the test's own)."""
    templates = config / "templates" / "templates.yaml"
    templates.write_text(templates.read_text() + PUK_CARD_TEMPLATE)


def produce_with_puk_process(reader: str) -> str:
    """Produces a card of template EmployeeCardWithPuk: a new PIN and the card's own PUK."""
    return ("name: produce\n"
            "inputs: [person, pin, puk]\n"
            "secret_inputs: [pin, puk]\n"
            "tasks:\n"
            "  - type: card_production\n"
            "    card_template: EmployeeCardWithPuk\n"
            f"    {reader}\n"
            "    subject: \"CN=${person},O=Example\"\n"
            "    fields: {USER_PIN: \"${pin}\", USER_PUK: \"${puk}\"}\n"
            "    card: \"${card}\"\n"
            "    holder: \"${person}\"\n")


_LOGIN_CHECK = """
import sys, pkcs11
module, label, role, pin = sys.argv[1:5]
token = pkcs11.lib(module).get_token(token_label=label)
try:
    token.open(rw=True, **{role: pin}).close()
except pkcs11.exceptions.PinIncorrect:
    sys.exit(3)
"""


def pin_works(token, pin: str, *, so: bool = False) -> bool:
    """Whether the token accepts PIN (the SO PIN with so=True), asked in a child process: this
    process must not load the module the gateway uses (SoftHSM2 reads its tokens once)."""
    done = subprocess.run([sys.executable, "-c", _LOGIN_CHECK, token.module_path, token.label,
                           "so_pin" if so else "user_pin", pin], env=token.env, capture_output=True, text=True,
                          timeout=60)
    if done.returncode not in (0, 3):
        raise RuntimeError(f"the PIN check failed: {done.stderr.strip()[-500:]}")
    return done.returncode == 0


def cardline_cli(orchestrator: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`cardline ARGS --orchestrator ORCHESTRATOR` with the session's admin certificate."""
    return subprocess.run([CARDLINE, "--tls-dir", str(default_pki().directory), "--tls-name", "admin", *args,
                           "--orchestrator", orchestrator], capture_output=True, text=True, input=stdin, timeout=60)


# `openssl crl -text` names reasons like this; None: not on the CRL.
CRL_REASON_OF_STATE = {"Active": None, "OnHold": "Certificate Hold", "Replaced": "Superseded",
                       "Retired": "Cessation Of Operation", "Revoked": "Cessation Of Operation"}


def crl_reasons(crl_der: bytes, directory: pathlib.Path) -> dict[int, str]:
    """serial -> reason of every entry of a DER CRL, as `openssl crl -text` prints them."""
    path = directory / "crl.der"
    path.write_bytes(crl_der)
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(path), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    entries = {}
    for block in text.split("Serial Number: ")[1:]:
        serial = int(block.split()[0], 16)
        reason = re.search(r"X509v3 CRL Reason Code:\s*\n\s*(.+?)\s*\n", block)
        entries[serial] = reason.group(1) if reason else "unspecified"
    return entries
