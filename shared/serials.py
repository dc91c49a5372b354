"""Certificate serial numbers as people see and type them.

Shown one way everywhere (CLI tables, JSON, docs): upper-case hex bytes joined by colons,
leading zero kept so every byte has two digits - the digits of `openssl x509 -serial`
(`serial=0DB6...`) with a colon between bytes: `0D:B6:...`. Accepted in any form openssl or
cardline prints: with or without colons or spaces, any case, with or without leading zeros
or a `serial=` / `0x` prefix. The store keeps lower-case hex without leading zeros.
"""
from __future__ import annotations

import string

from shared.errors import InvalidArgument


def parse_serial(text: str) -> int:
    """The serial number written in `text`; InvalidArgument naming it if it is none."""
    digits = text.strip()
    for prefix in ("serial=", "0x", "0X"):
        if digits.lower().startswith(prefix.lower()):
            digits = digits[len(prefix):]
    digits = digits.replace(":", "").replace(" ", "")
    if not digits or any(c not in string.hexdigits for c in digits):
        raise InvalidArgument(f"{text!r} is not a certificate serial number (hex digits, colons allowed, "
                              "e.g. 0D:B6:3F)", field="serial")
    return int(digits, 16)


def stored_hex(text: str) -> str:
    """`text` as the store keeps serials: lower-case hex without leading zeros."""
    return format(parse_serial(text), "x")


def show_serial(serial_hex: str) -> str:
    """A stored serial (hex, any case) as cardline shows it: `0D:B6:3F`."""
    if not serial_hex:
        return ""
    digits = format(int(serial_hex, 16), "X")
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))
