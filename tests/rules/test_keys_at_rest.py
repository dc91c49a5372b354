"""Keys at rest (docs/ca-connectors.md, docs/operator-guide.md): after a production, the SQLite
database, its WAL and shared-memory files, the key-encryption key (when made) and the CA key are readable
by the orchestrator's user only, and the CA key's passphrase is not beside it."""
from __future__ import annotations

import asyncio
import os
import stat

from orchestrator.ca.base import PASSPHRASE_ENV
from tests.rules.processes import produce_process
from tests.rules.rig import PIN, rule_orchestrator


def test_database_wal_shm_and_key_files_are_0600_after_a_production(tmp_path):
    os.umask(umask := os.umask(0o022))      # the usual umask: files would be 0644 unless made private

    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            data_dir = rig.orch.settings.data_dir
            # Stat while the orchestrator runs: the WAL and shared-memory files exist only then.
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.rglob("*")
                     if p.is_file() and (p.name.startswith("cardline.db") or p.name.endswith((".key", "-key.pem")))}
            return produced, data_dir, modes

    try:
        produced, data_dir, modes = asyncio.run(body())
    finally:
        os.umask(umask)
    assert produced.state == "SUCCEEDED", produced.error_message
    assert {"cardline.db", "cardline.db-wal", "cardline.db-shm", "ca-key.pem"} <= set(modes), modes
    assert all(mode == 0o600 for mode in modes.values()), {n: oct(m) for n, m in modes.items()}
    assert stat.S_IMODE(data_dir.stat().st_mode) & 0o077 == 0
    passphrase = os.environ[PASSPHRASE_ENV]
    assert not any("passphrase" in p.name for p in (data_dir / "ca").rglob("*"))
    assert not os.path.realpath(passphrase).startswith(os.path.realpath(data_dir / "ca") + os.sep)
