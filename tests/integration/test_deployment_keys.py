"""One CA configuration and one KEK per database (docs/ca-connectors.md, "Replicas on one
database"), on SQLite and PostgreSQL: the first orchestrator records the fingerprints, a later
one with the same keys is accepted, one with another built-in CA or KEK is refused with both
fingerprints named; two recording at once agree on one; revision 0009 upgrades a 0008
database. Real LocalCa directories and KEK files; the processes are in
tests/hardware/test_replicas_share_keys.py."""
from __future__ import annotations

import pathlib
import threading
import uuid

import pytest
from sqlalchemy.engine import make_url

from orchestrator.ca import LocalCa
from orchestrator.services.deployment_keys import (
    CA,
    KEK,
    KEK_NAME,
    ca_fingerprint,
    kek_fingerprint,
    require_shared_keys,
)
from orchestrator.services.key_archive import FileKek
from orchestrator.store import Store
from orchestrator.store.store import alembic_config, head_revision
from shared.errors import ConfigurationError


def _replica(tmp_path: pathlib.Path, name: str, *, ca_dir: pathlib.Path | None = None,
             kek_file: pathlib.Path | None = None) -> tuple[dict[str, LocalCa], FileKek]:
    """The built-in CA "local" and the KEK of one replica: its own (in tmp_path/NAME) unless given."""
    own = tmp_path / name
    return ({"local": LocalCa(ca_dir or own / "ca", "local", passphrase_file=tmp_path / "ca.passphrase")},
            FileKek(kek_file or own / "kek.key"))


def test_first_replica_records_its_keys_and_a_replica_with_the_same_keys_starts(store: Store, tmp_path):
    cas, kek = _replica(tmp_path, "a")
    require_shared_keys(store, cas, kek, "orchestrator-a")
    recorded = {(k.kind, k.name): k for k in store.deployment_keys.recorded()}
    assert set(recorded) == {(CA, "local"), (KEK, KEK_NAME)}
    assert recorded[(CA, "local")].fingerprint == ca_fingerprint(cas["local"])
    assert recorded[(KEK, KEK_NAME)].fingerprint == kek_fingerprint(kek)
    assert {k.first_seen_by for k in recorded.values()} == {"orchestrator-a"}

    same_cas, same_kek = _replica(tmp_path, "b", ca_dir=tmp_path / "a" / "ca", kek_file=tmp_path / "a" / "kek.key")
    require_shared_keys(store, same_cas, same_kek, "orchestrator-b")     # accepted
    assert {(k.kind, k.name): k for k in store.deployment_keys.recorded()} == recorded   # the first one's, unchanged


def test_replica_with_another_built_in_ca_is_refused_naming_both_fingerprints(store: Store, tmp_path):
    cas, kek = _replica(tmp_path, "a")
    require_shared_keys(store, cas, kek, "orchestrator-a")
    other_cas, _ = _replica(tmp_path, "b")
    theirs, mine = ca_fingerprint(cas["local"]), ca_fingerprint(other_cas["local"])
    assert theirs != mine

    with pytest.raises(ConfigurationError) as refused:
        require_shared_keys(store, other_cas, kek, "orchestrator-b")
    message = refused.value.message
    assert "CA 'local'" in message and theirs in message and mine in message
    assert "orchestrator-a" in message and "docs/ca-connectors.md" in message
    assert refused.value.context["violations"] == "1"     # the KEK is shared: only the CA is named
    assert [k.fingerprint for k in store.deployment_keys.recorded() if k.kind == CA] == [theirs]


def test_replica_with_another_kek_is_refused_naming_both_key_tags(store: Store, tmp_path):
    cas, kek = _replica(tmp_path, "a")
    require_shared_keys(store, cas, kek, "orchestrator-a")
    _, other_kek = _replica(tmp_path, "b")

    with pytest.raises(ConfigurationError) as refused:
        require_shared_keys(store, cas, other_kek, "orchestrator-b")
    message = refused.value.message
    assert f"key-encryption key {other_kek.kek_id}" in message     # this replica's, by its id
    assert kek_fingerprint(kek) in message and kek_fingerprint(other_kek) in message
    assert "CA 'local'" not in message
    assert refused.value.context["violations"] == "1"


def test_replica_with_another_ca_and_kek_is_refused_naming_both(store: Store, tmp_path):
    require_shared_keys(store, *_replica(tmp_path, "a"), "orchestrator-a")
    with pytest.raises(ConfigurationError) as refused:
        require_shared_keys(store, *_replica(tmp_path, "b"), "orchestrator-b")
    assert "CA 'local'" in refused.value.message and "key-encryption key file:" in refused.value.message
    assert refused.value.context["violations"] == "2"


def test_a_ca_configured_later_is_recorded_by_the_first_replica_that_has_it(store: Store, tmp_path):
    cas, kek = _replica(tmp_path, "a")
    require_shared_keys(store, cas, kek, "orchestrator-a")
    departmental = LocalCa(tmp_path / "departmental", "departmental", passphrase_file=tmp_path / "ca.passphrase")
    require_shared_keys(store, {**cas, "departmental": departmental}, kek, "orchestrator-b")
    recorded = {(k.kind, k.name): k.first_seen_by for k in store.deployment_keys.recorded()}
    assert recorded == {(CA, "local"): "orchestrator-a", (KEK, KEK_NAME): "orchestrator-a",
                        (CA, "departmental"): "orchestrator-b"}


def test_replicas_recording_different_keys_at_once_agree_on_one(store: Store, tmp_path):
    """Eight replicas, each with its own CA and KEK, record at the same moment on their own
    connections: exactly one set is recorded and every other replica is refused."""
    replicas = [_replica(tmp_path, f"r{n}") for n in range(8)]
    stores = [Store(store.database_url) for _ in replicas]
    start = threading.Barrier(len(replicas))
    outcome: dict[int, str] = {}

    def run(n: int) -> None:
        start.wait(timeout=30)
        try:
            require_shared_keys(stores[n], *replicas[n], f"orchestrator-{n}")
            outcome[n] = "accepted"
        except ConfigurationError:
            outcome[n] = "refused"

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(replicas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    assert sorted(outcome.values()) == ["accepted"] + ["refused"] * (len(replicas) - 1), outcome
    (winner,) = [n for n, result in outcome.items() if result == "accepted"]
    recorded = {(k.kind, k.name): (k.fingerprint, k.first_seen_by) for k in store.deployment_keys.recorded()}
    cas, kek = replicas[winner]
    assert recorded == {(CA, "local"): (ca_fingerprint(cas["local"]), f"orchestrator-{winner}"),
                        (KEK, KEK_NAME): (kek_fingerprint(kek), f"orchestrator-{winner}")}


def _upgrade_0008_database_and_record(url: str, tmp_path: pathlib.Path) -> None:
    from alembic import command

    store = Store(url)
    try:
        cfg = alembic_config(url)
        with store._engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0008_audit_hash_chain")
        assert store.schema_revision() == "0008_audit_hash_chain"
        store.migrate()
        assert store.schema_revision() == head_revision()          # 0009_deployment_keys and any later one
        assert store.deployment_keys.recorded() == []          # empty: the next start records
        require_shared_keys(store, *_replica(tmp_path, "a"), "orchestrator-a")
        assert len(store.deployment_keys.recorded()) == 2
    finally:
        store.close()


def test_migration_0009_upgrades_a_0008_sqlite_database(tmp_path):
    _upgrade_0008_database_and_record(f"sqlite:///{tmp_path / 'old.db'}", tmp_path)


@pytest.mark.postgres
def test_migration_0009_upgrades_a_0008_postgres_database(tmp_path, postgres_admin_url: str):
    import psycopg

    name = f"cardline_keys_{uuid.uuid4().hex[:10]}"
    admin = make_url(postgres_admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _upgrade_0008_database_and_record(
            make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False), tmp_path)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
