"""One CA configuration and one key-encryption key per database (docs/ca-connectors.md,
"Replicas on one database").

Replicas on one database share its certificates, CA request journal and sealed keys, so they
must sign with the same CAs and seal with the same KEK: a replica with a built-in CA of its
own would find the other's issued certificates missing from its CA and settle their requests
`not_issued` (C16), and could not open what the other sealed. The first orchestrator to start
on a database records the fingerprint of each CA (by name) and of the KEK; every later one
whose CA of the same name, or whose KEK, has another fingerprint is refused at start-up,
before it reconciles or serves anything.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

from orchestrator.ca.base import CaConnector
from orchestrator.services.key_archive import KeyEncryptionKey
from orchestrator.store.records import DeploymentKeyRecord
from orchestrator.store.store import Store
from shared.errors import ConfigurationError
from shared.logging import get_logger

log = get_logger(__name__)

CA = "ca"
KEK = "kek"
#: The one KEK of a database is recorded under this name.
KEK_NAME = "kek"
DOCS = 'docs/ca-connectors.md, "Replicas on one database"'


def ca_fingerprint(ca: CaConnector) -> str:
    """SHA-256 of the CA's signing certificate (DER): names its key and its identity."""
    return "sha256:" + hashlib.sha256(ca.ca_certificate_der()).hexdigest()


def kek_fingerprint(kek: KeyEncryptionKey) -> str:
    """The KEK's key tag (in every blob it seals): names the actual key, not its file or label."""
    return "key-tag:" + kek.key_tag


def require_shared_keys(store: Store, cas: Mapping[str, CaConnector], kek: KeyEncryptionKey,
                        orchestrator_id: str) -> None:
    """Records this orchestrator's CA and KEK fingerprints where none are recorded yet, and
    refuses (ConfigurationError listing every mismatch, with both fingerprints and what to do)
    when one differs from the recorded one. One transaction; nothing changes when refused."""
    mine = {(CA, name): ca_fingerprint(ca) for name, ca in cas.items()}
    mine[(KEK, KEK_NAME)] = kek_fingerprint(kek)
    recorded = store.deployment_keys.record_absent(
        [(kind, name, fingerprint) for (kind, name), fingerprint in mine.items()], orchestrator_id)
    problems = [_mismatch(kind, name, fingerprint, recorded[(kind, name)], kek)
                for (kind, name), fingerprint in mine.items() if recorded[(kind, name)].fingerprint != fingerprint]
    if problems:
        raise ConfigurationError(
            f"this orchestrator does not share the keys recorded for the database {store.database_url_shown} "
            f"(replicas on one database must use the same CAs and the same key-encryption key; {DOCS}):\n  "
            + "\n  ".join(problems), violations=str(len(problems)))
    log.info("deployment keys shared", database=store.database_url_shown,
             keys={f"{kind}:{name}": fingerprint for (kind, name), fingerprint in mine.items()})


def _mismatch(kind: str, name: str, fingerprint: str, recorded: DeploymentKeyRecord,
              kek: KeyEncryptionKey) -> str:
    seen = f"recorded {recorded.fingerprint} (first seen {recorded.first_seen.isoformat(timespec='seconds')} " \
           f"by {recorded.first_seen_by})"
    if kind == CA:
        return (f"CA {name!r}: this orchestrator's signing certificate is {fingerprint}, the database has {seen}; "
                f"give every replica the same CA {name!r}: one CA directory on shared storage (its key, "
                "passphrase file outside it, and its record of what it issued), the key there or on one "
                "PKCS#11 token")
    return (f"key-encryption key {kek.kek_id}: this orchestrator's is {fingerprint}, the database has {seen}; "
            "give every replica the same KEK: one shared key file (key_archive.file_path) or the same key "
            "on one PKCS#11 token (key_archive.kind pkcs11)")
