"""Fixture plugins, one module per real component (see tests/support/)."""
pytest_plugins = [
    "tests.support.softhsm",     # private SoftHSM2 tokens
    "tests.support.pcsc",        # private pcscd + vpcd + card emulator
    "tests.support.store_ca",    # SQLite/PostgreSQL stores, local CA
    "tests.support.pki",         # the session's mTLS PKI (CA, orchestrator, admin, gateways)
]
