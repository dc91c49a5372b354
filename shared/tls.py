"""Mutual TLS for every cardline connection: which files a process uses, gRPC credentials
built from them, who the peer is (role and name from its certificate, see shared/pki.py),
and a server interceptor that authorises each call by the caller's role (the permission
table of shared/permissions.py, per RPC) and refuses revoked certificates.

Plaintext exists only as an explicit development switch (`insecure`); a server started with
neither TLS material nor that switch refuses to start.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
import pathlib
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import CardlineError, ConfigurationError, PermissionDenied, Unauthenticated
from shared.files import write_atomic
from shared.logging import get_logger
from shared.pki import CA_CERT, CLIENT_ROLES, CRL, ROLES, common_name_of, crl_number, role_of, verified_crl
from shared.rpc import MESSAGE_SIZE_OPTIONS, status_of

if TYPE_CHECKING:
    from shared.config import GatewaySettings, OrchestratorSettings

log = get_logger(__name__)

#: Services anyone with a valid certificate may call.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
#: Environment of client commands (`cardline --tls-dir DIR ...` sets them too).
CLIENT_TLS_DIR_ENV, CLIENT_TLS_NAME_ENV = "CARDLINE_TLS_DIR", "CARDLINE_TLS_NAME"
CLIENT_INSECURE_ENV = "CARDLINE_INSECURE"
DEFAULT_CLIENT_NAME = "admin"


@dataclass(frozen=True)
class TlsFiles:
    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path
    crl: pathlib.Path | None = None

    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS server that requires a client certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=self.ca_pem(), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem(), private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())


def resolve(what: str, name: str, *, tls_dir: pathlib.Path | None = None, tls_ca: pathlib.Path | None = None,
            tls_cert: pathlib.Path | None = None, tls_key: pathlib.Path | None = None,
            tls_crl: pathlib.Path | None = None, insecure: bool = False, role: str | Collection[str] | None = None,
            common_name: str | None = None) -> TlsFiles | None:
    """The TLS files of WHAT (for messages): explicit paths win over TLS_DIR/ca.crt,
    TLS_DIR/NAME.crt, TLS_DIR/NAME.key and (optional) TLS_DIR/crl.pem. None when INSECURE.
    Raises ConfigurationError listing everything missing, and when the certificate does not
    carry ROLE (one role, or one of a collection) / COMMON_NAME."""
    if insecure:
        log.warning("plaintext gRPC without authentication: development only", component=what)
        return None
    d = pathlib.Path(tls_dir) if tls_dir else None
    wanted = {"CA certificate": (tls_ca, d / CA_CERT if d else None, "tls_ca", "ca.crt"),
              "certificate": (tls_cert, d / f"{name}.crt" if d else None, "tls_cert", f"{name}.crt"),
              "private key": (tls_key, d / f"{name}.key" if d else None, "tls_key", f"{name}.key")}
    found: dict[str, pathlib.Path] = {}
    missing: list[str] = []
    for label, (explicit, in_dir, setting, file) in wanted.items():
        path = pathlib.Path(explicit) if explicit else in_dir
        if path is None:
            missing.append(f"{label}: not given (set {setting}, or tls_dir holding {file})")
        elif not path.is_file():
            missing.append(f"{label}: {path} does not exist")
        else:
            found[label] = path
    crl = pathlib.Path(tls_crl) if tls_crl else (d / CRL if d and (d / CRL).is_file() else None)
    if tls_crl and crl is not None and not crl.is_file():
        missing.append(f"CRL: {crl} does not exist")
    if missing:
        raise ConfigurationError(
            f"{what} refuses to start without TLS material (mutual TLS is required):\n  "
            + "\n  ".join(missing)
            + "\n  Give --tls-dir DIR (see `cardline pki init` / `cardline gateway enroll`) or --tls-ca/--tls-cert/"
              "--tls-key, or --insecure for plaintext in development.")
    files = TlsFiles(found["CA certificate"], found["certificate"], found["private key"], crl)
    try:
        cert, ca = files.certificate(), x509.load_pem_x509_certificate(files.ca_pem())
    except ValueError as exc:
        raise ConfigurationError(f"{what}: cannot read {files.cert} or {files.ca}: {exc}") from None
    problems = []
    roles = {role} if isinstance(role, str) else set(role or ())
    if roles and role_of(cert) not in roles:
        problems.append(f"{files.cert} has role {role_of(cert)!r} (subject OU), {what} needs role "
                        f"{' or '.join(repr(r) for r in sorted(roles))}")
    if common_name is not None and common_name_of(cert) != common_name:
        problems.append(f"{files.cert} is issued to {common_name_of(cert)!r}, not {common_name!r}")
    if cert.issuer != ca.subject:
        problems.append(f"{files.cert} is not issued by the CA in {files.ca}")
    if problems:
        raise ConfigurationError(f"{what}: " + "; ".join(problems))
    mode = files.key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key readable by others; chmod 600 it", path=str(files.key), mode=oct(mode & 0o777))
    return files


def settings_tls(settings: OrchestratorSettings | GatewaySettings, what: str, name: str, *, role: str,
                 common_name: str | None = None) -> TlsFiles | None:
    """`resolve` for an OrchestratorSettings / GatewaySettings."""
    return resolve(what, name, tls_dir=settings.tls_dir, tls_ca=settings.tls_ca, tls_cert=settings.tls_cert,
                   tls_key=settings.tls_key, tls_crl=settings.tls_crl, insecure=settings.insecure, role=role,
                   common_name=common_name)


# -- clients ----------------------------------------------------------------------------------

def client_tls(*, tls_dir: str | pathlib.Path | None = None, name: str | None = None,
               insecure: bool | None = None) -> TlsFiles | None:
    """TLS files of a client command: arguments, else CARDLINE_TLS_DIR / CARDLINE_TLS_NAME
    (default admin) / CARDLINE_INSECURE."""
    tls_dir = tls_dir or os.environ.get(CLIENT_TLS_DIR_ENV) or None
    name = name or os.environ.get(CLIENT_TLS_NAME_ENV) or DEFAULT_CLIENT_NAME
    if insecure is None:
        insecure = os.environ.get(CLIENT_INSECURE_ENV, "").lower() in {"1", "true", "yes"}
    if insecure:
        return None
    if not tls_dir:
        raise ConfigurationError(f"no client certificate: give --tls-dir DIR (or {CLIENT_TLS_DIR_ENV}) holding ca.crt "
                                 f"and {name}.crt/{name}.key (`cardline pki init` makes 'admin'), or --insecure for "
                                 "a plaintext development server")
    return resolve("client", name, tls_dir=pathlib.Path(tls_dir), role=CLIENT_ROLES)


def client_channel(target: str, files: TlsFiles | Literal[True] | None = True) -> grpc.Channel:
    """A blocking channel to TARGET: with FILES' certificate, plaintext when FILES is None,
    from the client environment (client_tls()) when FILES is True."""
    files = client_tls() if files is True else files
    if files is None:
        return grpc.insecure_channel(target, options=MESSAGE_SIZE_OPTIONS)
    return grpc.secure_channel(target, files.channel_credentials(), options=MESSAGE_SIZE_OPTIONS)


# -- the peer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerIdentity:
    role: str | None
    name: str
    serial: int

    @property
    def actor(self) -> str:
        """How the audit names this caller: role, name and certificate serial."""
        return actor_of(self)


#: The verified caller of the RPC being served (set by the authorising interceptor before
#: the servicer runs); None in-process and on a plaintext (--insecure) server.
_CALLER: contextvars.ContextVar[PeerIdentity | None] = contextvars.ContextVar("cardline_caller", default=None)
#: The audit's actor when no certificate identifies the caller.
LOCAL_ACTOR = "local"


def actor_of(caller: PeerIdentity | None, *, serial: bool = True, nobody: str = LOCAL_ACTOR) -> str:
    """How cardline names CALLER in audit rows, logs and lease owners: `role:name#serial` (hex)
    of its certificate, without `#serial` when SERIAL is false (a renewed certificate of the
    same name is the same owner); NOBODY when no certificate identifies the caller. Stored
    audit rows carry this text: it must not change."""
    if caller is None:
        return nobody
    named = f"{caller.role or 'none'}:{caller.name}"
    return f"{named}#{caller.serial:x}" if serial else named


def current_caller() -> PeerIdentity | None:
    """Who called the RPC this code serves; None when nobody over mutual TLS did."""
    return _CALLER.get()


def current_actor() -> str:
    """The audit actor of the current call (LOCAL_ACTOR outside an authenticated call)."""
    return actor_of(_CALLER.get())


@contextlib.contextmanager
def calling_as(caller: PeerIdentity | None) -> Iterator[None]:
    """Runs the block as CALLER, as the authorising interceptor has the servicer of an admitted
    call run: for code that acts for an identity in-process, without a connection (tests of
    the service rules). The caller before is back after the block."""
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(token)


@lru_cache(maxsize=256)
def _identity_of_pem(pem: bytes) -> PeerIdentity:
    cert = x509.load_pem_x509_certificate(pem)
    return PeerIdentity(role_of(cert), common_name_of(cert), cert.serial_number)


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> PeerIdentity | None:
    """The verified client certificate of the call, None on a plaintext connection."""
    pems = list((context.auth_context() or {}).get("x509_pem_cert", ()))
    return _identity_of_pem(pems[0]) if pems else None


class RevocationList:
    """Revoked serials from a CRL file signed by the CA; re-read when the file changes (its
    mtime, size or inode). A CRL that turns unreadable or badly signed keeps the last good
    list and logs an error. `update` takes a newer CRL handed over in memory (a gateway's
    from the orchestrator's link) and persists it to the file. With MISSING_OK a file that
    does not exist yet is an empty list until a CRL arrives."""

    def __init__(self, path: pathlib.Path, ca_pem: bytes, *, missing_ok: bool = False) -> None:
        self.path = path
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._stamp: tuple[int, int, int] | None = None
        self.serials: set[int] = set()
        #: The current CRL's number (CRLNumber; -1 before any) and its DER encoding.
        self.number = -1
        self.der: bytes | None = None
        if missing_ok and not path.exists():
            log.info("no CRL yet; waiting for one", path=str(path))
        else:
            self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            if initial:
                raise ConfigurationError(f"CRL {self.path}: {exc}") from None
            if self._stamp is not None:
                log.error("CRL unreadable, keeping the last one", path=str(self.path), error=str(exc))
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"CRL {self.path}: {exc}") from None
            self._take(verified_crl(data, self._ca, str(self.path)))
            log.info("CRL loaded", path=str(self.path), revoked=len(self.serials), number=self.number)
        except ConfigurationError as exc:
            if initial:
                raise
            log.error("CRL rejected, keeping the last one", path=str(self.path), error=exc.message)
        self._stamp = stamp

    def _take(self, crl: x509.CertificateRevocationList) -> None:
        self.serials = {r.serial_number for r in crl}
        self.number = crl_number(crl)
        self.der = crl.public_bytes(serialization.Encoding.DER)

    def refresh(self) -> int:
        """Re-reads the file if it changed; the current CRL number."""
        self._load()
        return self.number

    def update(self, data: bytes, source: str) -> bool:
        """Takes the CRL in DATA (PEM or DER, from SOURCE) when the CA signed it and it is
        newer than the current one, and writes it to the file; False (and nothing changed)
        for one that is not newer. Raises ConfigurationError for one the CA did not sign."""
        self._load()
        crl = verified_crl(data, self._ca, source)
        if crl_number(crl) <= self.number:
            return False
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        self._take(crl)
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        log.info("CRL updated", source=source, path=str(self.path), revoked=len(self.serials), number=self.number)
        return True

    def is_revoked(self, serial: int) -> bool:
        self._load()
        return serial in self.serials


# -- authorisation ----------------------------------------------------------------------------

class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Every call needs a verified certificate that is not revoked (else UNAUTHENTICATED).
    The RPCs of OPEN_SERVICES answer any such certificate; every other RPC the roles of its
    row in PERMISSIONS (full method name `package.Service/Method` -> roles, see
    shared/permissions.py), and nobody when it has no row (else PERMISSION_DENIED)."""

    def __init__(self, permissions: Mapping[str, frozenset[str]], *, revocations: RevocationList | None = None) -> None:
        self.permissions = dict(permissions)
        self.revocations = revocations

    def allowed(self, method: str) -> frozenset[str] | None:
        """The roles that may call METHOD (`/package.Service/Method`); None: any certificate."""
        name = method.lstrip("/")
        if name.partition("/")[0] in OPEN_SERVICES:
            return None
        return self.permissions.get(name, frozenset())

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        allowed = self.allowed(method)

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            peer = peer_identity(context)
            err = self._refusal(peer, method, allowed)
            if err is not None:
                log.warning("call refused", method=method, reason=err.reason, error=err.message)
                await context.abort_with_status(status_of(err))
            # The servicer runs in this task after the check: services read it through
            # current_caller() without every signature carrying it.
            _CALLER.set(peer)

        return _guarded(handler, check)

    def _refusal(self, peer: PeerIdentity | None, method: str, allowed: frozenset[str] | None) -> CardlineError | None:
        if peer is None:
            return Unauthenticated(f"{method} needs a client certificate")
        if self.revocations is not None and self.revocations.is_revoked(peer.serial):
            return Unauthenticated(f"the certificate of {peer.name!r} (serial {peer.serial:x}) is revoked",
                                   name=peer.name)
        if allowed is not None and peer.role not in allowed:
            who = (f"is for role {' or '.join(sorted(allowed))}" if allowed
                   else "has no row in the permission table: nobody may call it")
            # Certificates of the role `client` that went away land here too: say what a role is.
            has = (f"has role {peer.role}" if peer.role else
                   f"has no role (its subject OU must be exactly one of {', '.join(ROLES)})")
            return PermissionDenied(f"{method} {who}; the certificate of {peer.name!r} {has} (docs/permissions.md)",
                                    role=peer.role or "", name=peer.name)
        return None


def _guarded(handler: grpc.RpcMethodHandler[Any, Any],
             check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]) -> grpc.RpcMethodHandler[Any, Any]:
    """HANDLER with CHECK(context) awaited before its behaviour runs."""
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = getattr(handler, attr)

    guarded: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]
    if handler.response_streaming:
        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await check(context)
            result = behaviour(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                await result
            else:
                for item in result:
                    yield item
        guarded = guarded_stream
    else:
        async def guarded_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await check(context)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result
        guarded = guarded_unary

    return make(guarded, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def server_security(files: TlsFiles | None, permissions: Mapping[str, frozenset[str]], *,
                    revocations: RevocationList | None = None,
                    ) -> tuple[grpc.ServerCredentials | None, list[grpc.aio.ServerInterceptor]]:
    """Credentials and interceptors of a server authorising by PERMISSIONS (shared/permissions.py):
    (None, []) for plaintext. REVOCATIONS (default: from the CRL of FILES, if any) refuses
    revoked callers."""
    if files is None:
        return None, []
    revocations = revocations or revocation_list(files)
    return files.server_credentials(), [AuthorizationInterceptor(permissions, revocations=revocations)]


def revocation_list(files: TlsFiles | None) -> RevocationList | None:
    """The RevocationList of FILES' CRL; None without TLS or without a CRL."""
    return RevocationList(files.crl, files.ca_pem()) if files is not None and files.crl else None


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> x509.Certificate | None:
    """The verified client certificate of the call itself, None on a plaintext connection."""
    pems = list((context.auth_context() or {}).get("x509_pem_cert", ()))
    return x509.load_pem_x509_certificate(pems[0]) if pems else None
