"""The orchestrator's metrics, health and start-up order (docs/observability.md), on an
in-process orchestrator with fake gateways (tests/support/fake_gateway.py)."""
from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from orchestrator import app as orchestrator_app
from orchestrator.services.pool import ReaderSelector
from shared import cards
from shared.errors import CaUnavailable, ConfigurationError, WriteRefused
from tests.rules.rig import RuleRig, fake_token, rule_orchestrator, settings_for, write_config
from tests.support.fake_gateway import FakeGateway
from tests.support.pki import default_pki
from tests.support.scrape import Samples, scrape

AUTH = "EmployeeAuthentication"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CARDS = "cardline.orchestrator.v1.CardService"
POOL = "cardline.orchestrator.v1.ReaderPoolService"


def metrics_address(rig: RuleRig) -> str:
    endpoint = rig.orch.metrics_endpoint
    assert endpoint is not None, "started without metrics_listen"
    return endpoint.address


async def eventually(condition: Callable[[], object], what: str, timeout_s: float = 20.0):
    """Polls the (async or plain) CONDITION until it is true; fails naming WHAT after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


def test_metrics_after_productions_show_pool_tasks_ca_certificates_and_links(tmp_path, monkeypatch):
    tokens = tuple(fake_token() for _ in range(4))

    async def body() -> tuple[Samples, Samples]:
        async with rule_orchestrator(tmp_path, tokens=tokens, metrics_listen="127.0.0.1:0",
                                     heartbeat_interval_s=0.3, health_check_interval_s=0.2) as rig:
            address = metrics_address(rig)
            assert (await rig.produce(AUTH, token=tokens[0])).succeeded
            rig.gateway.fail(WriteRefused("token full"), operation=cards.WriteCertificates)
            assert not (await rig.produce(AUTH, token=tokens[1])).succeeded      # certificate stays Issued
            local = rig.orch.cas["local"]
            real_issue = local.issue

            def unavailable(*args):
                raise CaUnavailable("the CA is away for this test")
            monkeypatch.setattr(local, "issue", unavailable)
            assert not (await rig.produce(AUTH, token=tokens[2])).succeeded
            monkeypatch.setattr(local, "issue", real_issue)

            # A production queued behind a lease on its reader: the queue as the scrape sees it.
            lease = await rig.orch.pool.acquire(ReaderSelector(reader_id=tokens[3].reader_id), kind="lease",
                                                holder="test")
            queued = asyncio.create_task(rig.produce(AUTH, token=tokens[3]))
            await eventually(lambda: rig.orch.pool.queue(), "the production queued")
            while_queued = await asyncio.to_thread(scrape, address)
            lease.release()
            assert (await queued).succeeded

            # A second station that stops answering heartbeats is detached.
            silent = FakeGateway("station-2", (fake_token(),), site="hq")
            await silent.connect(rig.orch.address)
            silent.fall_silent()
            try:
                after = await eventually(
                    lambda: _scrape_when(address, "cardline_gateway_missed_heartbeats_total", gateway="station-2"),
                    "the silent gateway counted")
                after = await eventually(
                    lambda: _scrape_when(address, "cardline_certificates", state="Active", at_least=2),
                    "both produced cards' certificates counted")
            finally:
                await silent.close()
            return while_queued, after

    while_queued, after = asyncio.run(body())
    assert while_queued.value("cardline_pool_queue_depth") == 1
    assert while_queued.value("cardline_pool_queue_oldest_wait_seconds") > 0
    assert while_queued.value("cardline_readers", state="LEASED") == 1
    m = after
    assert m.value("cardline_readers", state="CARD_PRESENT") >= 1
    assert m.value("cardline_pool_queue_wait_seconds_count", kind="task") >= 4
    assert m.value("cardline_pool_queue_wait_seconds_sum", kind="task") > 0
    assert m.value("cardline_card_task_duration_seconds_count", type="card_production", outcome="SUCCEEDED") == 2
    assert m.value("cardline_card_task_duration_seconds_count", type="card_production", outcome="FAILED") == 2
    assert m.value("cardline_card_task_duration_seconds_sum", type="card_production") > 0
    assert m.value("cardline_card_task_failures_total", reason="WRITE_REFUSED") == 1
    assert m.value("cardline_card_task_failures_total", reason="CA_UNAVAILABLE") == 1
    assert m.value("cardline_ca_request_duration_seconds_count", ca="local", operation="issue", outcome="ok") == 3
    assert m.value("cardline_ca_request_duration_seconds_sum", ca="local") > 0
    assert m.value("cardline_ca_request_failures_total", ca="local", operation="issue",
                   reason="CA_UNAVAILABLE") == 1
    assert m.value("cardline_certificates", state="Active") == 2
    assert m.value("cardline_certificates", state="Issued") == 1
    assert m.value("cardline_certificates_internal_issued") == 1
    assert m.value("cardline_certificates_internal_issued_oldest_age_seconds") > 0
    assert m.value("cardline_certificates_census_ok") == 1
    assert m.value("cardline_gateway_links", state="connected") == 1
    assert m.value("cardline_gateway_links", state="offline") == 1
    assert m.value("cardline_gateway_link_up", gateway="station-1") == 1
    assert m.value("cardline_gateway_missed_heartbeats_total", gateway="station-2") == 1
    assert m.value("cardline_health_check_up", component="database") == 1
    assert m.value("cardline_health_check_up", component="ca:local") == 1


async def _scrape_when(address: str, name: str, at_least: float = 1, **labels: str) -> Samples | None:
    samples = await asyncio.to_thread(scrape, address)
    return samples if samples.value(name, **labels) >= at_least else None


def test_two_orchestrators_in_one_process_keep_their_own_metrics(tmp_path):
    async def body() -> tuple[Samples, Samples]:
        async with rule_orchestrator(tmp_path / "a", metrics_listen="127.0.0.1:0") as a, \
                rule_orchestrator(tmp_path / "b", metrics_listen="127.0.0.1:0") as b:
            assert (await a.produce(AUTH)).succeeded
            return (await asyncio.to_thread(scrape, metrics_address(a)),
                    await asyncio.to_thread(scrape, metrics_address(b)))

    a, b = asyncio.run(body())
    assert a.value("cardline_card_task_duration_seconds_count") == 1
    assert b.value("cardline_card_task_duration_seconds_count") == 0


@pytest.fixture
def own_postgres_database(postgres_admin_url: str) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A database of this test alone, and a switch that refuses (False) or allows (True) every
    connection to it, dropping the open ones."""
    import psycopg

    name = f"cardline_health_{uuid.uuid4().hex[:10]}"
    admin = make_url(postgres_admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def reachable(allowed: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if allowed else "false"}')
            if not allowed:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False), reachable
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_health_not_serving_while_the_database_or_a_ca_is_away_and_serving_again_after(
        tmp_path, own_postgres_database):
    database_url, database_reachable = own_postgres_database
    ca_dir = tmp_path / "departmental-ca"

    async def body() -> None:
        async with rule_orchestrator(tmp_path, database_url=database_url, health_check_interval_s=0.2,
                                     health_check_timeout_s=3, metrics_listen="127.0.0.1:0",
                                     cas=[{"name": "departmental", "kind": "openssl", "directory": str(ca_dir)}]
                                     ) as rig, default_pki().aio_channel(rig.orch.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def statuses() -> tuple[int, int, int]:
                return tuple([(await stub.Check(health_pb2.HealthCheckRequest(service=s))).status
                              for s in ("", CARDS, POOL)])

            assert await statuses() == (SERVING, SERVING, SERVING)
            database_reachable(False)
            try:
                # The services that need the database stop serving; the reader pool goes on.
                await eventually(lambda: _is(statuses(), (NOT_SERVING, NOT_SERVING, SERVING)),
                                 "NOT_SERVING without the database")
                down = await asyncio.to_thread(scrape, metrics_address(rig))
                assert down.value("cardline_health_check_up", component="database") == 0
            finally:
                database_reachable(True)
            await eventually(lambda: _is(statuses(), (SERVING, SERVING, SERVING)),
                             "SERVING again with the database back")

            # The CA's directory goes away (an unmounted volume): `openssl ca` cannot work without
            # it. (A missing index.txt alone is a state the connector repairs, docs/ca-connectors.md.)
            away = ca_dir.with_name("departmental-ca.away")
            ca_dir.rename(away)
            try:
                await eventually(lambda: _is(statuses(), (NOT_SERVING, NOT_SERVING, SERVING)),
                                 "NOT_SERVING without the CA's directory")
            finally:
                away.rename(ca_dir)
            await eventually(lambda: _is(statuses(), (SERVING, SERVING, SERVING)),
                             "SERVING again with the CA back")

    asyncio.run(body())


async def _is(actual, expected) -> bool:
    return await actual == expected


def _broken_config(tmp_path: pathlib.Path) -> pathlib.Path:
    config_dir = write_config(tmp_path / "config")
    templates = config_dir / "templates" / "templates.yaml"
    templates.write_text(templates.read_text().replace("state_graph:", "state_graph: NoSuchGraph #", 1))
    return config_dir


def test_a_broken_configuration_stops_start_up_before_any_ca_or_database_is_created(tmp_path):
    settings = settings_for(tmp_path, _broken_config(tmp_path),
                            cas=[{"name": "departmental", "kind": "openssl", "directory": str(tmp_path / "dept-ca")}])
    with pytest.raises(ConfigurationError, match="NoSuchGraph"):
        asyncio.run(orchestrator_app.start(settings))
    assert not settings.data_dir.exists()            # no local CA, no SQLite database, no orchestrator id
    assert not (tmp_path / "dept-ca").exists()


@pytest.mark.postgres
def test_a_broken_configuration_leaves_a_postgresql_database_unmigrated(tmp_path, own_postgres_database):
    from sqlalchemy import create_engine, inspect

    database_url, _ = own_postgres_database
    settings = settings_for(tmp_path, _broken_config(tmp_path), database_url=database_url)
    with pytest.raises(ConfigurationError, match="NoSuchGraph"):
        asyncio.run(orchestrator_app.start(settings))
    engine = create_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
