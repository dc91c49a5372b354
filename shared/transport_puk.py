"""Transport PUKs diversified per card: each blank card leaves the factory with its own PUK
(SO PIN), derived from a master key and the card's token serial.

    puk = TransportPukRule(read_key_file(path), alphabet="0123456789", length=8).puk_for(serial)

Why diversification rather than a PUK store filled per card: whoever initialises blank cards
(`cardline tokens init --transport-puk-key`, a card bureau) and the orchestrator share one
key, and neither needs a list of cards from the other; the orchestrator derives the PUK of
the card a task has in its reader, for that card's serial only. One leaked card PUK reveals
nothing about another (HMAC-SHA256 is a pseudo-random function), and the PUK is replaced
at production (`InitialPUK`), after which the orchestrator keeps the card's own PUK
sealed (services/card_secrets.py).

The key file holds 64 hexadecimal digits (256 bits) on one line; `create_key_file` makes
one (mode 0600, never overwriting). Rendering: the HMAC output read as a big number, written
in the template's alphabet; the alphabet and length are limited so that at most 2^128 PUKs
are possible, which makes the rendering's bias below 2^-128.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets
import string
from dataclasses import dataclass, field

from shared.errors import ConfigurationError, InvalidArgument

DIGITS = string.digits
DEFAULT_LENGTH = 8
MIN_LENGTH = 4                          # PKCS#11 tokens (SoftHSM2 among them) refuse shorter PINs
KEY_BYTES = 32
_MAX_CHOICES = 2 ** 128                 # bias of the rendering below 2^-128 (the HMAC has 256 bits)
_CONTEXT = b"cardline/transport-puk/v1\x00token-serial:"


def format_problem(alphabet: str, length: int) -> str | None:
    """Why this alphabet and length cannot make transport PUKs, or None when they can."""
    if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
        return "the PUK alphabet needs at least two characters, each once"
    if any(c not in string.printable or c.isspace() for c in alphabet):
        return "the PUK alphabet may hold printable ASCII characters only, no spaces"
    if length < MIN_LENGTH:
        return f"a PUK needs at least {MIN_LENGTH} characters, found {length}"
    if len(alphabet) ** length > _MAX_CHOICES:
        return (f"{length} characters of a {len(alphabet)}-character alphabet exceed the 128 bits a transport "
                "PUK is derived with; use fewer characters")
    return None


@dataclass(frozen=True)
class TransportPukRule:
    """The master key of a card series and the shape its cards' PUKs must have."""

    key: bytes = field(repr=False)
    alphabet: str = DIGITS
    length: int = DEFAULT_LENGTH

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ConfigurationError(f"a transport PUK key has {KEY_BYTES} bytes, not {len(self.key)}")
        problem = format_problem(self.alphabet, self.length)
        if problem:
            raise ConfigurationError(problem)

    def puk_for(self, token_serial: str) -> str:
        """The transport PUK of the card with this token serial."""
        if not isinstance(token_serial, str) or not token_serial:
            raise InvalidArgument("a transport PUK is derived for a card's token serial, and none was given",
                                  field="token_serial")
        digest = hmac.new(self.key, _CONTEXT + token_serial.encode("utf-8"), hashlib.sha256).digest()
        number, base = int.from_bytes(digest, "big"), len(self.alphabet)
        chars = []
        for _ in range(self.length):
            number, index = divmod(number, base)
            chars.append(self.alphabet[index])
        return "".join(chars)


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte key of a transport PUK key file; a ConfigurationError names the file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConfigurationError(f"transport PUK key file {path}: {reason}", path=str(path)) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"transport PUK key file {path}: expected {2 * KEY_BYTES} hexadecimal digits "
                                 "on one line", path=str(path))
    return key


def create_key_file(path: str | os.PathLike[str]) -> pathlib.Path:
    """Writes a new random key (mode 0600); an existing file is never replaced."""
    path = pathlib.Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists; a transport PUK key is never overwritten (the cards "
                                 "initialised with it would lose their PUK)", path=str(path)) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path}: {exc.strerror}", path=str(path)) from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path
