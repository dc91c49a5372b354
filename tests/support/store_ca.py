"""pytest fixtures for the store (SQLite and PostgreSQL) and the local CA.

PostgreSQL: the server named by CARDLINE_TEST_POSTGRES_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test, used only to create and drop databases);
if none answers, a throwaway cluster is started with initdb/pg_ctl from
/usr/lib/postgresql/*/bin (as the `postgres` user when running as root) on a free port in a
temporary directory. Either way the tests use their own database, created once per session
and dropped at the end; each test starts from empty tables. If neither works the
PostgreSQL tests are skipped with the reason.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.ca import LocalCa
from orchestrator.ca.base import PASSPHRASE_ENV
from orchestrator.store import Store

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TABLES = ("ca_requests", "orchestrator_instances", "audit_events", "archived_keys", "object_relations", "certificates",
          "task_steps", "tasks", "process_instances", "cards", "card_secrets", "client_requests",
          "deployment_keys", "order_cards", "orders", "pool_gateways", "pool_readers", "pool_holds", "pool_waiters",
          "pool_leases")


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _reachable(url: str) -> str | None:
    """None if a superuser-ish connection works, else why not."""
    import psycopg
    try:
        with psycopg.connect(_libpq(url), connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[str]:
    """initdb + pg_ctl start on a free port; yields an admin URL; stops and deletes it."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no initdb found (/usr/lib/postgresql/*/bin or PATH)")
    pg_ctl = str(pathlib.Path(initdb).with_name("pg_ctl"))
    as_user: list[str] = []
    user = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:      # PostgreSQL refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no postgres user to run initdb as") from None
        as_user, user = ["runuser", "-u", "postgres", "--"], "postgres"
    tmp = tempfile.mkdtemp(prefix="cardline-pg-")
    shutil.chown(tmp, user=user)
    data, port = os.path.join(tmp, "data"), _free_port()
    run = lambda *cmd: subprocess.run(as_user + list(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        run(pg_ctl, "-D", data, "-l", os.path.join(tmp, "log"), "-w", "-t", "30", "start",
            "-o", f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{exc.cmd[len(as_user)]} failed: {exc.stderr.strip()[-500:]}") from None
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A URL with the right to create databases: the configured server or a throwaway one."""
    url = os.environ.get("CARDLINE_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    why = _reachable(url)
    if why is None:
        yield url
        return
    try:
        cluster = _throwaway_cluster()
        admin = cluster.__enter__()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"PostgreSQL: {url} not reachable ({why}) and no throwaway cluster ({exc})")
    try:
        yield admin
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A database of this test session, migrated to head; dropped at the end."""
    import psycopg
    name = f"cardline_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(postgres_admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    store = Store(url)
    store.migrate()
    store.close()
    try:
        yield url
    finally:
        with psycopg.connect(_libpq(postgres_admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_store(postgres_database_url: str) -> Iterator[Store]:
    """A migrated Store on PostgreSQL with empty tables."""
    store = Store(postgres_database_url)
    store.migrate()
    with store._engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path: pathlib.Path) -> Iterator[Store]:
    """A migrated Store on a fresh SQLite file."""
    store = Store(f"sqlite:///{tmp_path / 'cardline.db'}")
    store.migrate()
    yield store
    store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> Store:
    """The same test on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def local_ca(tmp_path: pathlib.Path) -> LocalCa:
    """A LocalCa in its own directory (key and records under tmp_path/ca; its passphrase in
    tmp_path/ca-key.passphrase, outside the CA directory)."""
    return LocalCa(tmp_path / "ca", name="test-local", passphrase_file=tmp_path / "ca-key.passphrase")


@pytest.fixture(scope="session", autouse=True)
def ca_passphrase_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """The passphrase file of every CA a test starts without a passphrase_file of its own:
    $CARDLINE_CA_PASSPHRASE_FILE names it (outside every CA directory) for the whole session,
    subprocesses included. Created by the first CA that starts."""
    path = tmp_path_factory.mktemp("ca-passphrase") / "ca-key.passphrase"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PASSPHRASE_ENV, str(path))
        yield path
