"""pytest plugin: one development PKI (shared/pki.py) for the whole test session, so that
every end-to-end test runs over mutual TLS like production.

`cardline_pki` (session, autouse) creates a CA, the orchestrator's certificate and a
certificate "admin" of role admin under the session's tmp dir, makes it the default of
tests/support/processes.py (orchestrator and gateway subprocesses get --tls-dir, health
checks and helper channels use "admin"), and points CARDLINE_TLS_DIR at it so `cardline`
client commands run by tests authenticate as admin. Gateway certificates are issued on
demand (`gateway(gateway_id)`), clients of other roles too (`client(name, role)`). Code
outside pytest (bench/) gets a PKI in a temporary directory from `default_pki()`.
"""
from __future__ import annotations

import atexit
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
import pytest

from shared.pki import Pki, check_enrollment, enrollment_of, init_pki, role_of
from shared.tls import CLIENT_INSECURE_ENV, CLIENT_TLS_DIR_ENV, CLIENT_TLS_NAME_ENV, TlsFiles

ADMIN = "admin"
_ISSUING = threading.Lock()


@dataclass(frozen=True)
class TlsRig:
    pki: Pki

    @property
    def directory(self) -> pathlib.Path:
        return self.pki.directory

    def files(self, name: str = ADMIN) -> TlsFiles:
        return TlsFiles(self.pki.ca_cert_path, self.pki.cert_path(name), self.pki.key_path(name))

    def gateway(self, gateway_id: str, *, site: str = "", labels: Mapping[str, str] | None = None) -> TlsFiles:
        """The gateway certificate of GATEWAY_ID enrolled at SITE with LABELS (issued on first
        use; one enrolled elsewhere is revoked and issued anew)."""
        wanted = check_enrollment(site, dict(labels or {}))
        # Stations start in parallel threads, and a revocation reads, changes and rewrites revoked.json.
        with _ISSUING:
            if self.pki.cert_path(gateway_id).exists():
                cert = self.pki.certificate(gateway_id)
                valid = cert.serial_number not in self.pki.revoked_serials()
                if valid and role_of(cert) == "gateway" and enrollment_of(cert) == wanted:
                    return self.files(gateway_id)
                if valid:
                    self.pki.revoke(gateway_id)
            self.pki.issue("gateway", gateway_id, enrollment=wanted)
        return self.files(gateway_id)

    def client(self, name: str, role: str = ADMIN) -> TlsFiles:
        """The certificate NAME of ROLE (admin, operator, auditor, service; issued on first use)."""
        self.pki.ensure(role, name)
        return self.files(name)

    def channel(self, address: str, name: str = ADMIN) -> grpc.Channel:
        return grpc.secure_channel(address, self.files(name).channel_credentials())

    def aio_channel(self, address: str, name: str = ADMIN) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self.files(name).channel_credentials())

    def settings(self) -> dict:
        """Overrides for config.load(OrchestratorSettings | GatewaySettings, ...)."""
        return {"tls_dir": self.directory}


def make_rig(directory: pathlib.Path) -> TlsRig:
    pki = init_pki(directory)
    pki.issue("orchestrator", "orchestrator")
    pki.issue(ADMIN, ADMIN)
    return TlsRig(pki)


_default: TlsRig | None = None


def default_pki() -> TlsRig:
    """The session's PKI; outside pytest one made on first use in a temporary directory."""
    global _default
    if _default is None:
        directory = pathlib.Path(tempfile.mkdtemp(prefix="cardline-pki-"))
        atexit.register(shutil.rmtree, directory, True)
        _default = make_rig(directory / "pki")
    return _default


@pytest.fixture(scope="session", autouse=True)
def cardline_pki(tmp_path_factory: pytest.TempPathFactory):
    global _default
    previous, _default = _default, make_rig(tmp_path_factory.mktemp("pki") / "pki")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CLIENT_TLS_DIR_ENV, str(_default.directory))
        mp.setenv(CLIENT_TLS_NAME_ENV, ADMIN)
        mp.delenv(CLIENT_INSECURE_ENV, raising=False)
        yield _default
    _default = previous
