"""Mutual TLS between orchestrator, gateways and clients (README, Mutual TLS; issue 4): who gets in,
who is refused, and how.

One orchestrator process for the module with a PKI of its own (so that revocations made
here touch no other test), certificates made with the real `cardline pki` / `cardline
gateway enroll` commands where the test is about them.
"""
from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest

from orchestrator import app as orchestrator_app
from shared import config
from shared.errors import ConfigurationError
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import (
    certificate_service_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    reader_pool_service_pb2_grpc,
)
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from shared.tls import TlsFiles
from tests.support.pki import TlsRig, make_rig
from tests.support.processes import (
    CARDLINE,
    free_port,
    gateway_process,
    open_link,
    orchestrator_process,
    wait_for_pooled_reader,
)

HEALTH_SERVICE = "cardline.orchestrator.v1.CertificateService"


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> TlsRig:
    """A PKI of this module's own (CA, orchestrator, admin)."""
    return make_rig(tmp_path_factory.mktemp("mtls") / "pki")


@pytest.fixture(scope="module")
def other_rig(tmp_path_factory) -> TlsRig:
    """A second, unrelated CA with certificates of every role."""
    other = make_rig(tmp_path_factory.mktemp("other") / "pki")
    other.gateway("station-1")
    return other


@pytest.fixture(scope="module")
def orchestrator(rig, tmp_path_factory) -> Iterator[str]:
    with orchestrator_process(tmp_path_factory.mktemp("orch") / "orchestrator", tls_dir=rig.directory) as address:
        yield address


def secure(address: str, files: TlsFiles) -> grpc.Channel:
    return grpc.secure_channel(address, files.channel_credentials())


def list_certificates(channel: grpc.Channel) -> certificate_pb.ListCertificatesResponse:
    return certificate_service_pb2_grpc.CertificateServiceStub(channel).ListCertificates(
        certificate_pb.ListCertificatesRequest(), timeout=10)


def _call_with_empty_request(channel: grpc.Channel, path: str, server_streaming: bool) -> object:
    if server_streaming:
        streaming: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
        return list(streaming(b"", timeout=10))
    unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    return unary(b"", timeout=10)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# -- who gets in ------------------------------------------------------------------------------

@pytest.mark.hardware
def test_enrolled_gateway_attaches_over_mutual_tls_and_its_token_joins_the_pool(rig, orchestrator, softhsm_token,
                                                                               tmp_path):
    station = tmp_path / "station-a-tls"
    enrolled = subprocess.run([CARDLINE, "gateway", "enroll", "--pki-dir", str(rig.directory), "--gateway-id",
                               "station-a", "--out", str(station)], capture_output=True, text=True)
    assert enrolled.returncode == 0, enrolled.stderr
    assert sorted(p.name for p in station.iterdir()) == ["ca.crt", "crl.pem", "station-a.crt", "station-a.key"]
    assert (station / "station-a.key").stat().st_mode & 0o777 == 0o600
    with gateway_process(orchestrator, "station-a", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                         env=softhsm_token.env, tls_dir=station, client=rig.files()) as (gw, _proc):
        pooled = wait_for_pooled_reader(orchestrator, lambda r: r.reader.token_label == softhsm_token.label,
                                        client=rig.files())
        assert pooled.gateway_id == "station-a"
        # the station's own GatewayService is mutual TLS too: an admin certificate may list its readers
        with secure(gw, rig.files()) as channel:
            readers = gateway_pb2_grpc.GatewayServiceStub(channel).ListReaders(gateway_pb2.ListReadersRequest()).readers
        assert softhsm_token.label in {r.token_label for r in readers}
        # ... and a gateway certificate may not (GatewayService is for admins, docs/permissions.md)
        with secure(gw, rig.files("station-a")) as channel:
            err = refusal(lambda: gateway_pb2_grpc.GatewayServiceStub(channel).ListReaders(
                gateway_pb2.ListReadersRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.hardware      # starts cardline processes
def test_admin_certificate_calls_the_client_api_and_health(rig, orchestrator):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with secure(orchestrator, rig.files()) as channel:
        assert list(list_certificates(channel).certificates) == []     # answered, on a fresh store
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.hardware      # starts cardline processes
def test_cli_client_command_authenticates_with_tls_dir_and_refuses_to_run_without_it(rig, orchestrator):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDLINE_")}
    ok = subprocess.run([CARDLINE, "--tls-dir", str(rig.directory), "certs", "list", "--orchestrator", orchestrator,
                         "--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([CARDLINE, "certs", "list", "--orchestrator", orchestrator], capture_output=True,
                             text=True, env=env)
    assert missing.returncode == 2
    assert "--tls-dir" in missing.stderr and "--insecure" in missing.stderr


# -- who is refused at the handshake ----------------------------------------------------------

@pytest.mark.hardware      # starts cardline processes
def test_client_without_certificate_is_refused(rig, orchestrator):
    credentials = grpc.ssl_channel_credentials(root_certificates=rig.pki.ca_cert_path.read_bytes())
    with grpc.secure_channel(orchestrator, credentials) as channel:
        err = refusal(lambda: list_certificates(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.hardware      # starts cardline processes
def test_client_with_certificate_of_another_ca_is_refused(rig, other_rig, orchestrator):
    # it even trusts the right CA: only its own certificate is foreign
    foreign = TlsFiles(rig.pki.ca_cert_path, other_rig.pki.cert_path("admin"), other_rig.pki.key_path("admin"))
    with secure(orchestrator, foreign) as channel:
        err = refusal(lambda: list_certificates(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    with secure(orchestrator, TlsFiles(rig.pki.ca_cert_path, other_rig.pki.cert_path("station-1"),
                                       other_rig.pki.key_path("station-1"))) as channel:
        err = refusal(lambda: open_link(channel, "station-1"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.hardware      # starts cardline processes
def test_plaintext_client_is_refused_by_a_tls_server(orchestrator):
    with grpc.insecure_channel(orchestrator) as channel:
        err = refusal(lambda: list_certificates(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


# -- who is refused by role, name or revocation ----------------------------------------------

@pytest.mark.hardware      # starts cardline processes
def test_gateway_certificate_calling_client_rpcs_is_permission_denied(rig, orchestrator):
    with secure(orchestrator, rig.gateway("station-p")) as channel:
        err = refusal(lambda: list_certificates(channel))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_from_rpc(err).reason == "PERMISSION_DENIED"
        assert "station-p" in (err.details() or "") and "gateway" in (err.details() or "")
        err = refusal(lambda: reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel).ListReaders(
            pool_pb.ListReadersRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.hardware      # starts cardline processes
def test_gateway_certificate_is_permission_denied_on_every_client_service(rig, orchestrator):
    from orchestrator.app import CLIENT_API

    with secure(orchestrator, rig.gateway("station-q")) as channel:
        for module in CLIENT_API:
            (service,) = module.DESCRIPTOR.services_by_name.values()
            method = service.methods[0]
            path = f"/{service.full_name}/{method.name}"
            err = refusal(functools.partial(_call_with_empty_request, channel, path, method.server_streaming))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, path


@pytest.mark.hardware      # starts cardline processes
def test_admin_certificate_opening_the_gateway_link_is_permission_denied(rig, orchestrator):
    with secure(orchestrator, rig.files()) as channel:
        err = refusal(lambda: open_link(channel, "admin"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.hardware      # starts cardline processes
def test_cli_as_auditor_reads_but_is_refused_reconcile_naming_rpc_roles_and_caller(rig, orchestrator):
    issued = subprocess.run([CARDLINE, "pki", "issue", "--pki-dir", str(rig.directory), "--role", "auditor",
                             "--name", "auditor-7"], capture_output=True, text=True)
    assert issued.returncode == 0, issued.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDLINE_")}
    as_auditor = [CARDLINE, "--tls-dir", str(rig.directory), "--tls-name", "auditor-7"]
    read = subprocess.run([*as_auditor, "certs", "list", "--orchestrator", orchestrator, "--json"],
                          capture_output=True, text=True, env=env)
    assert read.returncode == 0, read.stderr
    refused = subprocess.run([*as_auditor, "reconcile", "--orchestrator", orchestrator], capture_output=True,
                             text=True, env=env)
    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr
    assert "CaService/Reconcile is for role admin" in refused.stderr
    assert "'auditor-7' has role auditor" in refused.stderr


@pytest.mark.hardware      # starts cardline processes
def test_gateway_whose_hello_names_another_gateway_is_refused(rig, orchestrator):
    with secure(orchestrator, rig.gateway("station-b")) as channel:
        err = refusal(lambda: open_link(channel, "station-c"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "station-c" in (err.details() or "") and "station-b" in (err.details() or "")
        assert open_link(channel, "station-b").HasField("welcome")     # its own name is welcome
    with secure(orchestrator, rig.files()) as channel:
        gateways = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel).ListReaders(pool_pb.ListReadersRequest())
    assert "station-c" not in {r.gateway_id for r in gateways.readers}


@pytest.mark.hardware      # starts cardline processes
def test_revoked_gateway_certificate_is_refused_without_restarting_the_orchestrator(rig, orchestrator):
    files = rig.gateway("station-r")
    with secure(orchestrator, files) as channel:
        assert open_link(channel, "station-r").HasField("welcome")
    revoked = subprocess.run([CARDLINE, "pki", "revoke", "--pki-dir", str(rig.directory), "--name", "station-r"],
                             capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stderr
    with secure(orchestrator, files) as channel:           # a new connection, same certificate
        err = refusal(lambda: open_link(channel, "station-r"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_from_rpc(err).reason == "UNAUTHENTICATED" and "revoked" in (err.details() or "")
    # a new certificate for the same station is accepted
    rig.pki.issue("gateway", "station-r")
    with secure(orchestrator, rig.files("station-r")) as channel:
        assert open_link(channel, "station-r").HasField("welcome")


@pytest.mark.hardware
def test_gateway_process_with_a_revoked_certificate_never_joins_the_pool(rig, orchestrator, softhsm_token, tmp_path):
    rig.gateway("station-x")
    rig.pki.revoke("station-x")
    with gateway_process(orchestrator, "station-x", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                         env=softhsm_token.env, tls_dir=rig.directory, client=rig.files()):
        time.sleep(2)
        with secure(orchestrator, rig.files()) as channel:
            pool = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel)
            readers = pool.ListReaders(pool_pb.ListReadersRequest())
        assert "station-x" not in {r.gateway_id for r in readers.readers}
    log = (tmp_path / "gateway" / "gateway.log").read_text()
    assert "UNAUTHENTICATED" in log and "revoked" in log


# -- no plaintext by accident -----------------------------------------------------------------

def _serve(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDLINE_")}
    return subprocess.run([CARDLINE, *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.hardware      # starts cardline processes
def test_orchestrator_without_tls_material_or_insecure_flag_refuses_to_start(tmp_path):
    ran = _serve(["orchestrator", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path)])
    assert ran.returncode == 2
    assert "refuses to start without TLS material" in ran.stderr
    for what in ("ca.crt", "orchestrator.crt", "orchestrator.key", "--insecure"):
        assert what in ran.stderr
    assert not (tmp_path / "cardline.db").exists()           # stopped before touching anything


@pytest.mark.hardware      # starts cardline processes
def test_gateway_without_tls_material_or_insecure_flag_refuses_to_start(tmp_path):
    ran = _serve(["gateway", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path),
                  "--gateway-id", "station-9", "--no-pcsc", "--tls-dir", str(tmp_path / "nothing-here")])
    assert ran.returncode == 2
    assert "station-9.crt" in ran.stderr and "does not exist" in ran.stderr and "--insecure" in ran.stderr


def test_in_process_orchestrator_without_tls_material_raises_configuration_error(tmp_path):
    import asyncio

    settings = config.load(config.OrchestratorSettings, listen="127.0.0.1:0", migrate=True, data_dir=tmp_path)
    assert settings.insecure is False
    with pytest.raises(ConfigurationError, match="without TLS material"):
        asyncio.run(orchestrator_app.start(settings))


def test_gateway_certificate_of_another_gateway_id_is_refused_at_start(rig, tmp_path):
    import asyncio

    from gateway import app as gateway_app

    rig.gateway("station-s")
    settings = config.load(config.GatewaySettings, listen="127.0.0.1:0", data_dir=tmp_path, gateway_id="station-t",
                           pcsc=False, tls_ca=rig.pki.ca_cert_path, tls_cert=rig.pki.cert_path("station-s"),
                           tls_key=rig.pki.key_path("station-s"))
    with pytest.raises(ConfigurationError, match="issued to 'station-s', not 'station-t'"):
        asyncio.run(gateway_app.start(settings))


@pytest.mark.hardware      # starts cardline processes
def test_insecure_flag_serves_plaintext_for_development(tmp_path):
    with (orchestrator_process(tmp_path / "orchestrator", insecure=True) as address,
          grpc.insecure_channel(address) as channel):
        assert list_certificates(channel) is not None
