"""Two `cardline orchestrator serve` processes on one database (PostgreSQL, and SQLite through
one shared database URL): the second is refused at start-up when its built-in CA or its KEK is
not the one the first recorded, with both fingerprints in its error; with the same CA directory
and KEK file it starts and both serve (docs/ca-connectors.md, "Replicas on one database")."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from orchestrator.services.key_archive import FileKek
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, free_port, orchestrator_process

pytestmark = pytest.mark.hardware      # starts cardline processes


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> str:
    """One database both replicas name: a SQLite file outside both data directories, or the
    session's PostgreSQL database with empty tables."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'cardline.db'}"
    request.getfixturevalue("postgres_store")          # empties the tables, deployment_keys too
    return request.getfixturevalue("postgres_database_url")


def _env(database_url: str, *, ca_dir: pathlib.Path | None = None, kek_file: pathlib.Path | None = None) -> dict:
    """The replica's environment: the shared database; the built-in CA in CA_DIR and the KEK in
    KEK_FILE when given (else its own, in its data directory)."""
    env = {**os.environ, "CARDLINE_ORCHESTRATOR_DATABASE_URL": database_url}
    if ca_dir is not None:
        env["CARDLINE_ORCHESTRATOR_CAS"] = json.dumps([{"name": "local", "kind": "local", "directory": str(ca_dir)}])
    if kek_file is not None:
        env["CARDLINE_ORCHESTRATOR_KEY_ARCHIVE__FILE_PATH"] = str(kek_file)
    return env


def _refused_start(data_dir: pathlib.Path, env: dict) -> str:
    """Starts an orchestrator that must refuse to start: its exit status is 2 (a configuration
    error) within a minute; returns what it printed."""
    data_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([CARDLINE, "orchestrator", "serve", "--migrate", "--listen", f"127.0.0.1:{free_port()}",
                           "--data-dir", str(data_dir), "--tls-dir", str(default_pki().directory)],
                          env=env, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}, expected a refusal:\n{output[-3000:]}"
    assert "orchestrator serving" not in output
    return output


def _ca_fingerprint(ca_dir: pathlib.Path) -> str:
    cert = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_second_replica_with_another_built_in_ca_is_refused_and_with_the_same_one_serves(
        tmp_path: pathlib.Path, shared_database_url: str):
    a, b = tmp_path / "a", tmp_path / "b"
    with orchestrator_process(a, _env(shared_database_url)):
        output = _refused_start(b, _env(shared_database_url, kek_file=a / "kek.key"))
        assert "CA 'local'" in output
        assert _ca_fingerprint(a / "ca") in output and _ca_fingerprint(b / "ca") in output
        assert "key-encryption key" not in output.split("CA 'local'", 1)[1]    # the shared KEK is not named

        with orchestrator_process(b, _env(shared_database_url, ca_dir=a / "ca", kek_file=a / "kek.key")):
            pass                                        # serving (healthy) beside the first


def test_second_replica_with_another_kek_is_refused_naming_both_key_tags(
        tmp_path: pathlib.Path, shared_database_url: str):
    a, b = tmp_path / "a", tmp_path / "b"
    with orchestrator_process(a, _env(shared_database_url)):
        output = _refused_start(b, _env(shared_database_url, ca_dir=a / "ca"))
        theirs, mine = FileKek(a / "kek.key").key_tag, FileKek(b / "kek.key").key_tag
        assert theirs != mine
        assert f"key-tag:{theirs}" in output and f"key-tag:{mine}" in output
        assert "CA 'local'" not in output
