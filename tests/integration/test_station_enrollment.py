"""Stations are enrolled, not self-described; revocation reaches every station (issue 10,
docs/stations.md). Real processes over mutual TLS: one orchestrator for the module with a PKI
of its own (revocations made here touch no other test), stations enrolled with the real
`cardline gateway enroll`, certificates revoked with the real `cardline pki revoke`.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import pytest
from cryptography import x509

from shared.proto import gateway_pb2, gateway_pb2_grpc, reader_pool_service_pb2_grpc
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from shared.tls import TlsFiles
from tests.support.pki import TlsRig, make_rig
from tests.support.processes import CARDLINE, free_port, gateway_process, open_link, orchestrator_process

T = TypeVar("T")
#: The issue's bound for a revoked gateway's open link, and for a CRL to reach a station.
WITHIN_S = 10.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> TlsRig:
    return make_rig(tmp_path_factory.mktemp("stations") / "pki")


@pytest.fixture(scope="module")
def orchestrator(rig, tmp_path_factory) -> Iterator[str]:
    # --tls-dir is the PKI directory: `cardline pki revoke` rewrites the crl.pem it reads.
    with orchestrator_process(tmp_path_factory.mktemp("orch") / "orchestrator", tls_dir=rig.directory) as address:
        yield address


def enroll(rig: TlsRig, gateway_id: str, out: pathlib.Path, *options: str) -> TlsFiles:
    ran = subprocess.run([CARDLINE, "gateway", "enroll", "--pki-dir", str(rig.directory), "--gateway-id", gateway_id,
                          "--out", str(out), *options], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return TlsFiles(out / "ca.crt", out / f"{gateway_id}.crt", out / f"{gateway_id}.key", out / "crl.pem")


def revoke(rig: TlsRig, name: str) -> int:
    ran = subprocess.run([CARDLINE, "pki", "revoke", "--pki-dir", str(rig.directory), "--name", name],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return rig.pki.certificate(name).serial_number


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """PROBE's first truthy answer, polled until TIMEOUT_S; TimeoutError naming WHAT."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answer := probe():
            return answer
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


def gateway_in_pool(orchestrator: str, rig: TlsRig, gateway_id: str) -> pool_pb.Gateway | None:
    with grpc.secure_channel(orchestrator, rig.files().channel_credentials()) as channel:
        listed = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel).ListGateways(
            pool_pb.ListGatewaysRequest(), timeout=5)
    return next((g for g in listed.gateways if g.gateway_id == gateway_id), None)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def list_readers(gateway: str, files: TlsFiles) -> grpc.RpcError | None:
    """None when FILES' certificate may list the gateway's readers, else the refusal."""
    with grpc.secure_channel(gateway, files.channel_credentials()) as channel:
        try:
            gateway_pb2_grpc.GatewayServiceStub(channel).ListReaders(gateway_pb2.ListReadersRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc
    return None


def crl_serials(path: pathlib.Path) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())}


# -- where a station stands -------------------------------------------------------------------

@pytest.mark.hardware
def test_station_stands_where_it_was_enrolled_and_a_hello_claiming_elsewhere_is_refused(
        rig, orchestrator, softhsm_token, tmp_path):
    station = enroll(rig, "station-a", tmp_path / "station-a-tls", "--site", "site-a", "--label", "line=1")
    # The honest station configures no site: the pool shows the enrolled one.
    with gateway_process(orchestrator, "station-a", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                         env=softhsm_token.env, tls_dir=station.cert.parent, client=rig.files()):
        pooled = wait_for(lambda: gateway_in_pool(orchestrator, rig, "station-a"), 20, "station-a in the pool")
        assert (pooled.site, dict(pooled.labels), pooled.connected) == ("site-a", {"line": "1"}, True)
    # The hostile one: its own valid certificate, a hello that says it stands elsewhere.
    with grpc.secure_channel(orchestrator, station.channel_credentials()) as channel:
        err = refused(lambda: open_link(channel, "station-a", site="site-b"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "claims site 'site-b'" in (err.details() or "") and "site 'site-a'" in (err.details() or "")
        err = refused(lambda: open_link(channel, "station-a", site="site-a", labels={"line": "2"}))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "labels {'line'='2'}" in (err.details() or "")
        # a hello repeating the enrolled place, or claiming nothing, is welcome
        assert open_link(channel, "station-a", site="site-a", labels={"line": "1"}).HasField("welcome")
        assert open_link(channel, "station-a").HasField("welcome")


@pytest.mark.hardware
def test_gateway_configured_with_another_site_than_enrolled_refuses_to_start(rig, tmp_path):
    station = enroll(rig, "station-b", tmp_path / "station-b-tls", "--site", "site-a")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDLINE_")}
    ran = subprocess.run([CARDLINE, "gateway", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
                          str(tmp_path / "gateway"), "--gateway-id", "station-b", "--site", "site-b", "--no-pcsc",
                          "--tls-dir", str(station.cert.parent)], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 2, ran.stderr
    assert "site 'site-b'" in ran.stderr and "enrolled with site 'site-a'" in ran.stderr


# -- revocation reaches the stations ----------------------------------------------------------

@pytest.mark.hardware
def test_revoked_client_is_refused_by_a_gateway_once_the_crl_reaches_it_over_the_link(
        rig, orchestrator, softhsm_token, tmp_path):
    station = enroll(rig, "station-c", tmp_path / "station-c-tls")
    carol = rig.client("carol")
    data_dir = tmp_path / "gateway"
    with gateway_process(orchestrator, "station-c", data_dir, pkcs11_module=softhsm_token.module_path,
                         env=softhsm_token.env, tls_dir=station.cert.parent, client=rig.files()) as (gateway, proc):
        wait_for(lambda: getattr(gateway_in_pool(orchestrator, rig, "station-c"), "connected", False), 20,
                 "station-c attached")
        assert list_readers(gateway, carol) is None              # carol is served before her revocation
        serial = revoke(rig, "carol")
        revoked_at = time.monotonic()
        err = wait_for(lambda: list_readers(gateway, carol), WITHIN_S, "the gateway refusing revoked carol")
        print(f"revoked client refused by the gateway {time.monotonic() - revoked_at:.2f} s after the revocation")
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (err.details() or "")
        assert error_from_rpc(err).reason == "UNAUTHENTICATED"
        assert proc.poll() is None                                # the same gateway process, never restarted
        assert list_readers(gateway, rig.files()) is None        # the admin, not revoked, still is served
    # It came over the link: the enrollment's copy does not know it, the one kept in the data dir does.
    assert serial not in crl_serials(station.cert.parent / "crl.pem")
    assert serial in crl_serials(data_dir / "crl.pem")


@pytest.mark.hardware
def test_revoked_gateway_open_link_is_closed_within_ten_seconds(rig, orchestrator, softhsm_token, tmp_path):
    station = enroll(rig, "station-d", tmp_path / "station-d-tls")
    data_dir = tmp_path / "gateway"
    with gateway_process(orchestrator, "station-d", data_dir, pkcs11_module=softhsm_token.module_path,
                         env=softhsm_token.env, tls_dir=station.cert.parent, client=rig.files()):
        wait_for(lambda: getattr(gateway_in_pool(orchestrator, rig, "station-d"), "connected", False), 20,
                 "station-d attached")
        revoke(rig, "station-d")
        revoked_at = time.monotonic()
        wait_for(lambda: not getattr(gateway_in_pool(orchestrator, rig, "station-d"), "connected", True), WITHIN_S,
                 "the revoked gateway's link closed")
        closed_after = time.monotonic() - revoked_at
        assert closed_after < WITHIN_S
        print(f"revoked gateway's link closed {closed_after:.2f} s after the revocation")
        # The gateway hears why (its side of the stream may learn it a moment after the pool does).
        wait_for(lambda: "orchestrator refused this gateway" in (log := (data_dir / "gateway.log").read_text())
                 and "has been revoked" in log, WITHIN_S, "the gateway logging that its certificate was revoked")
