"""Every caller gets exactly its role (docs/permissions.md): every RPC of every cardline
server, called as every role over mutual TLS, is allowed or refused exactly as the permission
table (shared/permissions.py) says; certificates that lie about their role get nothing; the
servicer sees who called (shared/tls.py current_caller()).

One in-process orchestrator and one in-process gateway serving real mutual TLS on 127.0.0.1
ports they choose, with a PKI of this module's own holding a certificate of every role.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool

from gateway import app as gateway_app
from orchestrator import app as orchestrator_app
from shared import config
from shared.errors import ConfigurationError
from shared.permissions import PERMISSIONS, methods_of
from shared.pki import ROLES
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.proto import reader_pool_service_pb2_grpc
from shared.rpc import Server
from shared.tls import PeerIdentity, TlsFiles, current_caller, server_security
from tests.support.pki import TlsRig, make_rig

#: The certificate each role calls with (CN -> role); admin and orchestrator come from make_rig.
CALLERS = {"admin": "admin", "floor-1": "operator", "auditor-1": "auditor", "encoder-1": "service",
           "station-1": "gateway", "orchestrator": "orchestrator"}
#: Long enough for a loaded 2-core machine to answer a refusal; an allowed call that waits
#: longer (a lease queue, a watch) has passed the interceptor already.
DEADLINE_S = 5.0
REFUSED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> TlsRig:
    """A PKI of this module's own with a certificate of every role."""
    rig = make_rig(tmp_path_factory.mktemp("permissions") / "pki")
    for name, role in CALLERS.items():
        rig.pki.ensure(role, name)
    assert {role for role in CALLERS.values()} == set(ROLES), "a role without a caller in this test"
    return rig


def _signed_by_the_ca(rig: TlsRig, directory: pathlib.Path, common_name: str, units: list[str]) -> TlsFiles:
    """A client certificate the CA really signed, with subject OU(s) UNITS: what a careless
    or hostile issuer could produce, not what `cardline pki issue` makes."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca = rig.pki.ca_certificate()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline"),
                         *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(rig.pki._ca_key(), hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{common_name}-{'-'.join(units) or 'none'}"
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    return TlsFiles(rig.pki.ca_cert_path, directory / f"{stem}.crt", directory / f"{stem}.key")


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


async def call_outcome(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    """The status of METHOD (`package.Service/Method`) called with an empty request (an
    empty request stream): OK when it answered, or its first streamed message arrived."""
    descriptor = descriptor_pool.Default().FindMethodByName(method.replace("/", "."))
    path = f"/{method}"
    try:
        if descriptor.client_streaming:
            bidi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(path)
            stream = bidi(_nothing(), timeout=DEADLINE_S)
            await stream.read()
            stream.cancel()
        elif descriptor.server_streaming:
            streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
            responses = streaming(b"", timeout=DEADLINE_S)
            await responses.read()
            responses.cancel()
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
            await unary(b"", timeout=DEADLINE_S)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def _servers(rig: TlsRig, tmp_path: pathlib.Path):
    (tmp_path / "secrets").mkdir(parents=True)
    orchestrator = await orchestrator_app.start(config.load(
        config.OrchestratorSettings, listen="127.0.0.1:0", migrate=True, data_dir=tmp_path / "orchestrator",
        secrets_dir=tmp_path / "secrets", tls_dir=rig.directory,
        # The service caller may lease some readers: its allowed calls then reach the lease
        # service rather than its reader-selector refusal (docs/pool.md).
        pool={"service_readers": {"encoder-1": {"kind": "pkcs11"}}}))
    try:
        gateway = await gateway_app.start(config.load(
            config.GatewaySettings, listen="127.0.0.1:0", data_dir=tmp_path / "gateway", gateway_id="station-1",
            pcsc=False, tls_dir=rig.directory))
    except BaseException:
        await orchestrator.stop()
        raise
    return orchestrator, gateway


def test_every_rpc_of_every_server_answers_exactly_the_roles_of_its_row_in_the_permission_table(rig, tmp_path):
    async def body():
        orchestrator, gateway = await _servers(rig, tmp_path)
        try:
            served = {**{m: orchestrator.address for m in methods_of(orchestrator.server.service_names)},
                      **{m: gateway.address for m in methods_of(gateway.server.service_names)}}
            # one channel per role and server
            channels = {(name, address): rig.aio_channel(address, name) for name in CALLERS
                        for address in {orchestrator.address, gateway.address}}
            cases = [(method, name) for method in served for name in CALLERS]
            try:
                codes = await asyncio.gather(*(call_outcome(channels[name, served[method]], method)
                                               for method, name in cases))
            finally:
                await asyncio.gather(*(c.close() for c in channels.values()))
            return served, dict(zip(cases, codes, strict=True))
        finally:
            await gateway.stop()
            await orchestrator.stop()

    served, codes = asyncio.run(body())
    assert sorted(served) == sorted(PERMISSIONS), "the servers serve other RPCs than the table names"
    wrong = []
    for (method, name), code in codes.items():
        role = CALLERS[name]
        allowed = role in PERMISSIONS[method]
        if (allowed and code in REFUSED) or (not allowed and code is not grpc.StatusCode.PERMISSION_DENIED):
            wrong.append(f"{method} as {role}: {code.name}, the table says {'allowed' if allowed else 'refused'}")
    assert wrong == [], "\n".join(wrong)
    assert len(codes) == len(PERMISSIONS) * len(ROLES)


def test_certificates_lying_about_their_role_are_refused_and_a_revoked_one_is_unauthenticated(rig, tmp_path):
    hostile = tmp_path / "hostile"
    two_roles = _signed_by_the_ca(rig, hostile, "mallory", ["auditor", "admin"])    # which one? neither
    old_client = _signed_by_the_ca(rig, hostile, "legacy", ["client"])             # the role that went away
    no_role = _signed_by_the_ca(rig, hostile, "nobody", [])
    admin_by_name = _signed_by_the_ca(rig, hostile, "admin", ["auditor"])          # the CN is not the role
    revoked = rig.client("gone-1", "admin")
    rig.pki.revoke("gone-1")
    reconcile = "cardline.orchestrator.v1.CaService/Reconcile"             # admin only
    read = "cardline.orchestrator.v1.CertificateService/ListCertificates"  # admin, operator, auditor

    async def body():
        orchestrator, gateway = await _servers(rig, tmp_path)
        outcomes = {}
        try:
            for label, files in [("two roles", two_roles), ("client", old_client), ("no role", no_role),
                                 ("auditor named admin", admin_by_name), ("revoked admin", revoked)]:
                async with grpc.aio.secure_channel(orchestrator.address, files.channel_credentials()) as channel:
                    outcomes[label] = (await call_outcome(channel, reconcile), await call_outcome(channel, read))
            async with grpc.aio.secure_channel(orchestrator.address, old_client.channel_credentials()) as channel:
                pool = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await pool.ListReaders(pool_pb.ListReadersRequest(), timeout=DEADLINE_S)
            return outcomes, refused.value.details()
        finally:
            await gateway.stop()
            await orchestrator.stop()

    outcomes, details = asyncio.run(body())
    assert details == ("/cardline.orchestrator.v1.ReaderPoolService/ListReaders is for role admin or auditor or "
                       "operator or service; the certificate of 'legacy' has no role (its subject OU must be exactly "
                       "one of admin, operator, auditor, service, gateway, orchestrator) (docs/permissions.md)")
    denied, ok = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
    assert outcomes == {"two roles": (denied, denied), "client": (denied, denied), "no role": (denied, denied),
                        "auditor named admin": (denied, ok),
                        "revoked admin": (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED)}


def test_a_server_serving_an_rpc_without_a_row_refuses_to_start_naming_it(rig, tmp_path, monkeypatch):
    def without(service: str) -> dict[str, frozenset[str]]:
        return {m: roles for m, roles in PERMISSIONS.items() if not m.startswith(f"{service}/")}

    monkeypatch.setattr(orchestrator_app, "PERMISSIONS", without("cardline.orchestrator.v1.CaService"))
    monkeypatch.setattr(gateway_app, "PERMISSIONS", without("cardline.gateway.v1.GatewayService"))
    with pytest.raises(ConfigurationError) as orchestrator_refused:
        asyncio.run(_servers(rig, tmp_path))
    assert "orchestrator: 4 RPC(s) have no row in the permission table" in orchestrator_refused.value.message
    assert "cardline.orchestrator.v1.CaService/Reconcile" in orchestrator_refused.value.message
    monkeypatch.setattr(orchestrator_app, "PERMISSIONS", PERMISSIONS)
    with pytest.raises(ConfigurationError) as gateway_refused:
        asyncio.run(_servers(rig, tmp_path / "again"))
    assert "gateway station-1: 3 RPC(s) have no row" in gateway_refused.value.message
    assert "cardline.gateway.v1.GatewayService/RunStep" in gateway_refused.value.message


class CallerEchoingReaderPool(reader_pool_service_pb2_grpc.ReaderPoolServiceServicer):
    """A test servicer: answers with who current_caller() says called, as a gateway id."""

    @staticmethod
    def _caller() -> str:
        caller = current_caller()
        return f"{caller.role}:{caller.name}" if caller else "nobody"

    async def ListGateways(self, request, context):
        await asyncio.sleep(0)             # let concurrent calls interleave: each must keep its own caller
        return pool_pb.ListGatewaysResponse(gateways=[pool_pb.Gateway(gateway_id=self._caller())])

    async def ListReaders(self, request, context):
        return pool_pb.ListReadersResponse(readers=[pool_pb.PooledReader(gateway_id=self._caller())])

    async def WatchReaders(self, request, context):
        yield pool_pb.WatchReadersResponse(reader=pool_pb.PooledReader(gateway_id=self._caller()))


def test_servicer_sees_the_verified_caller_of_its_own_call(rig):
    service = pool_pb.DESCRIPTOR.services_by_name["ReaderPoolService"].full_name

    async def body():
        credentials, interceptors = server_security(rig.files("orchestrator"), PERMISSIONS)
        server = Server("127.0.0.1:0", [(reader_pool_service_pb2_grpc.add_ReaderPoolServiceServicer_to_server,
                                         CallerEchoingReaderPool(), service)],
                        credentials=credentials, interceptors=interceptors)
        await server.start()
        try:
            async def ask(name: str) -> tuple[str, str]:
                async with rig.aio_channel(server.address, name) as channel:
                    stub = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel)
                    listed = await stub.ListGateways(pool_pb.ListGatewaysRequest(), timeout=DEADLINE_S)
                    watch = stub.WatchReaders(pool_pb.WatchReadersRequest(), timeout=DEADLINE_S)
                    first = await watch.read()
                    watch.cancel()
                    return listed.gateways[0].gateway_id, first.reader.gateway_id

            seen = await asyncio.gather(*(ask(name) for name in ["admin", "floor-1", "auditor-1", "encoder-1"]))
            return seen, current_caller()
        finally:
            await server.stop()

    seen, outside = asyncio.run(body())
    assert seen == [("admin:admin", "admin:admin"), ("operator:floor-1", "operator:floor-1"),
                    ("auditor:auditor-1", "auditor:auditor-1"), ("service:encoder-1", "service:encoder-1")]
    assert outside is None                              # no call being served, nobody called
    assert PeerIdentity("auditor", "auditor-1", 0xAB).actor == "auditor:auditor-1#ab"
