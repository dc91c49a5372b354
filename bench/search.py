"""B5 — searching Issued certificates (rule C4) at 1,000,000 certificates ÷ at 10,000, on
PostgreSQL.

Two databases side by side, each migrated to the current schema and filled in the server
(INSERT ... SELECT FROM generate_series, one statement): a small one of 10,000 certificates
and a large one of CARDLINE_BENCH_B5_ROWS (default 1,000,000). Both hold the same number of
certificates in the internal `Issued` state (CARDLINE_BENCH_B5_ISSUED, default 100: what
failed tasks leave until an operator handles them), spread over time among the others
(`Active`, `Revoked`); every row carries the same real DER certificate. The timed query is the
store query behind `cardline orchestrator certs issued` (CertificateService
SearchIssuedCertificates → Store.certificates.list(state="Issued", ...)), run in turns on
the two databases, median of the rounds:

    B5                          every Issued certificate (the command without options)
    B5_template_older_than      --template EmployeeAuthentication --older-than 1h

The server is CARDLINE_TEST_POSTGRES_URL (default postgres@127.0.0.1:5432/test, used only to
create and drop the two databases) or, when none answers, a throwaway cluster as the tests
start one (tests/support/store_ca.py). The databases are dropped afterwards.

    .venv/bin/python bench/search.py
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
import sys
import time
import uuid
from collections.abc import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bench.common import interleaved, prepare_bench_process, say, size
from orchestrator.store import Store
from tests.support.store_ca import DEFAULT_ADMIN_URL, _libpq, _reachable, _throwaway_cluster

ISSUED = "Issued"
SMALL = 10_000
ROUNDS = 30
FILL = """
INSERT INTO certificates (id, serial_hex, issuer, subject, not_before, not_after, der, template, ca_name, state,
                          task_id, task_error_reason, task_error_message, created_at, updated_at)
SELECT md5('bench-id' || g) :: uuid :: text,
       to_hex(g),
       'CN=Bench CA,O=cardline bench',
       'CN=Bench Employee ' || g || ',O=cardline bench',
       now() - (:rows - g) * interval '90 seconds',
       now() - (:rows - g) * interval '90 seconds' + interval '730 days',
       :der,
       CASE WHEN g % 2 = 0 THEN 'EmployeeAuthentication' ELSE 'EmployeeSignature' END,
       'local',
       CASE WHEN g % :every = 0 THEN 'Issued' WHEN g % 10 = 1 THEN 'Revoked' ELSE 'Active' END,
       NULL,
       CASE WHEN g % :every = 0 THEN 'WRITE_REFUSED' END,
       CASE WHEN g % :every = 0 THEN 'the token refused the certificate' END,
       now() - (:rows - g) * interval '90 seconds',
       now() - (:rows - g) * interval '90 seconds'
FROM generate_series(1, :rows) AS g
"""


def sample_certificate() -> bytes:
    """One real DER certificate (EC P-256, about the size of a card's) for every row."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench Employee 1"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=730)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@contextlib.contextmanager
def postgres_admin() -> Iterator[str]:
    url = os.environ.get("CARDLINE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    if _reachable(url) is None:
        yield url
    else:
        with _throwaway_cluster() as admin:
            yield admin


@contextlib.contextmanager
def empty_database(admin_url: str, label: str) -> Iterator[str]:
    """A database of its own (its URL), empty; dropped on the way out."""
    import psycopg
    name = f"cardline_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_database(admin_url: str, label: str) -> Iterator[Store]:
    """A database of its own, migrated; dropped on the way out."""
    with empty_database(admin_url, f"b5_{label}") as url:
        store = Store(url)
        try:
            store.migrate()
            yield store
        finally:
            store.close()


def fill(store: Store, rows: int, issued: int, der: bytes) -> float:
    """ROWS certificates, every (ROWS // ISSUED)-th one Issued; seconds taken."""
    t0 = time.perf_counter()
    with store._engine.begin() as conn:
        conn.execute(text(FILL), {"rows": rows, "every": rows // issued, "der": der})
    with store._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE certificates"))
    return time.perf_counter() - t0


def measure() -> dict:
    rows = size("CARDLINE_BENCH_B5_ROWS", 1_000_000)
    issued = size("CARDLINE_BENCH_B5_ISSUED", 100)
    small = min(SMALL, rows)
    if rows % issued or small % issued:
        raise SystemExit(f"B5: {issued} Issued certificates must divide {small} and {rows} rows evenly")
    rounds = size("CARDLINE_BENCH_B5_ROUNDS", ROUNDS)
    der = sample_certificate()
    with postgres_admin() as admin, bench_database(admin, "small") as small_db, \
            bench_database(admin, "large") as large_db:
        fill(small_db, small, issued, der)
        load_s = fill(large_db, rows, issued, der)

        def every_issued(store: Store) -> None:
            found = store.certificates.list(state=ISSUED)
            if len(found) != issued:
                raise RuntimeError(f"B5: {len(found)} Issued certificates found, {issued} stored")

        def template_older_than(store: Store) -> None:
            store.certificates.list(state=ISSUED, template="EmployeeAuthentication",
                                    issued_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))

        all_issued = interleaved({"small": lambda: every_issued(small_db),
                                  "large": lambda: every_issued(large_db)}, rounds)
        filtered = interleaved({"small": lambda: template_older_than(small_db),
                                "large": lambda: template_older_than(large_db)}, rounds)
    return {
        "B5": round(all_issued["large"] / all_issued["small"], 3),
        "B5_template_older_than": round(filtered["large"] / filtered["small"], 3),
        "B5_small_ms": round(all_issued["small"] * 1000, 2),
        "B5_large_ms": round(all_issued["large"] * 1000, 2),
        "B5_rows": rows,
        "B5_issued": issued,
        "B5_load_s": round(load_s, 1),
    }


def main() -> None:
    prepare_bench_process()
    for key, value in measure().items():
        say(f"{key}: {value}")


if __name__ == "__main__":
    main()
