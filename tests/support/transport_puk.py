"""The tests' transport PUK key: blank test cards (fake tokens, SoftHSM2 tokens) get the PUK
diversified for their serial from it, as a card bureau's would (shared/transport_puk.py)."""
from __future__ import annotations

import pathlib

from shared.transport_puk import TransportPukRule

KEY_FILE = "transport-puk.key"          # the name examples/templates give transport_puk_key_file
TEST_KEY = bytes.fromhex("5eed" * 16)   # test-only; a real one comes from create_key_file
_RULE = TransportPukRule(TEST_KEY)


def transport_puk(token_serial: str) -> str:
    """The PUK a blank test card with this serial leaves the factory with."""
    return _RULE.puk_for(token_serial)


def write_transport_key(secrets_dir: pathlib.Path) -> pathlib.Path:
    """Puts the tests' key where the example card templates look for it (secrets_dir)."""
    secrets_dir.mkdir(parents=True, exist_ok=True)
    path = secrets_dir / KEY_FILE
    path.write_text(TEST_KEY.hex() + "\n")
    path.chmod(0o600)
    return path
