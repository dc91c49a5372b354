"""A CA's CRL as `openssl crl -text` reads it: an independent check of what a CA publishes."""
from __future__ import annotations

import pathlib
import re
import subprocess
import tempfile

#: `openssl crl -text` wording -> RFC 5280 reason name.
OPENSSL_REASONS = {
    "Unspecified": "unspecified", "Key Compromise": "keyCompromise", "CA Compromise": "cACompromise",
    "Affiliation Changed": "affiliationChanged", "Superseded": "superseded",
    "Cessation Of Operation": "cessationOfOperation", "Certificate Hold": "certificateHold",
    "Remove From CRL": "removeFromCRL", "Privilege Withdrawn": "privilegeWithdrawn",
    "AA Compromise": "aACompromise",
}


def openssl_crl_reasons(ca) -> dict[int, str]:
    """serial -> RFC 5280 reason name of every entry of CA's current CRL (`ca.crl_der()`),
    read by `openssl crl -text` after openssl verified the CRL against `ca.ca_certificate_der()`.
    An entry without a reason extension reads `unspecified`."""
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        (d / "crl.der").write_bytes(ca.crl_der())
        (d / "ca.der").write_bytes(ca.ca_certificate_der())
        subprocess.run(["openssl", "x509", "-inform", "DER", "-in", d / "ca.der", "-out", d / "ca.pem"], check=True)
        out = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", d / "crl.der", "-noout", "-text",
                              "-CAfile", d / "ca.pem"], check=True, capture_output=True, text=True)
    assert "verify OK" in out.stderr + out.stdout, out.stderr
    reasons: dict[int, str] = {}
    for block in re.split(r"\n\s*Serial Number: ", out.stdout)[1:]:
        serial = int(block.split("\n", 1)[0].strip(), 16)
        found = re.search(r"X509v3 CRL Reason Code:\s*\n\s*(.+)", block)
        reasons[serial] = OPENSSL_REASONS[found.group(1).strip()] if found else "unspecified"
    return reasons
