"""A station's site and labels are enrolled in its gateway certificate (shared/pki.py), the
orchestrator's link takes them from there (orchestrator/api/link.py), the gateway checks its
settings against them (gateway/app.py); CRLs handed over in memory (shared/tls.py
RevocationList.update) — docs/stations.md."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.app import follow_crl_file, station_place, station_revocations
from orchestrator.api.link import enrolled_place
from shared import config
from shared.errors import ConfigurationError, InvalidArgument, PermissionDenied
from shared.limits import (
    MAX_ENROLLED_LABEL_VALUE_CHARS,
    MAX_ENROLLED_LABELS,
    MAX_ENROLLMENT_BYTES,
    MAX_LABEL_KEY_CHARS,
)
from shared.pki import (
    STATION_ENROLLMENT_OID,
    Enrollment,
    check_enrollment,
    enrollment_from_options,
    enrollment_of,
    init_pki,
)
from shared.proto import link_pb2
from shared.tls import PeerIdentity, RevocationList, TlsFiles


@pytest.fixture
def pki(tmp_path):
    return init_pki(tmp_path / "pki")


def test_enrollment_round_trips_through_the_gateway_certificate(pki):
    pki.issue("gateway", "station-1", enrollment=check_enrollment("hq", {"line": "a", "floor": "2 – east"}))
    assert enrollment_of(pki.certificate("station-1")) == Enrollment("hq", {"floor": "2 – east", "line": "a"})
    extension = pki.certificate("station-1").extensions.get_extension_for_oid(STATION_ENROLLMENT_OID)
    assert not extension.critical          # TLS stacks that do not know it must still accept the certificate


def test_certificate_without_enrollment_stands_nowhere(pki):
    pki.issue("gateway", "station-1")
    assert enrollment_of(pki.certificate("station-1")) == Enrollment()


def test_only_a_gateway_certificate_is_enrolled(pki):
    with pytest.raises(InvalidArgument, match="only a gateway certificate carries a site"):
        pki.issue("admin", "carol", enrollment=Enrollment("hq"))


@pytest.mark.parametrize(("site", "labels", "complaint"), [
    ("-hq", {}, "site"), ("h q", {}, "site"), ("x" * 65, {}, "site"),
    ("hq", {"bad key": "v"}, "label key"), ("hq", {"k" * (MAX_LABEL_KEY_CHARS + 1): "v"}, "label key"),
    ("hq", {"k": "a\nb"}, "printable"), ("hq", {"k": "v" * (MAX_ENROLLED_LABEL_VALUE_CHARS + 1)}, "printable"),
    ("hq", {f"k{i}": "v" for i in range(MAX_ENROLLED_LABELS + 1)}, f"at most {MAX_ENROLLED_LABELS}"),
    ("hq", {f"k{i}": "€" * MAX_ENROLLED_LABEL_VALUE_CHARS for i in range(MAX_ENROLLED_LABELS)}, "bytes in UTF-8"),
])
def test_enrollment_refuses_what_a_selector_could_not_name(site, labels, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        check_enrollment(site, labels)


def test_largest_ascii_enrollment_is_accepted_within_the_byte_bound_and_read_back(pki):
    # The largest in ASCII; tests/integration/test_bounds.py connects a gateway enrolled so.
    labels = {f"{i:02d}".ljust(MAX_LABEL_KEY_CHARS, "k"): "v" * MAX_ENROLLED_LABEL_VALUE_CHARS
              for i in range(MAX_ENROLLED_LABELS)}
    enrollment = check_enrollment("s" * 64, labels)
    assert enrollment == Enrollment("s" * 64, labels)
    assert 64 + sum(len(k) + len(v) for k, v in labels.items()) <= MAX_ENROLLMENT_BYTES
    pki.issue("gateway", "station-1", enrollment=enrollment)
    assert enrollment_of(pki.certificate("station-1")) == enrollment


def test_label_options_need_key_equals_value_once():
    assert enrollment_from_options(None, []) is None
    assert enrollment_from_options("hq", ["line=a", "empty="]) == Enrollment("hq", {"empty": "", "line": "a"})
    with pytest.raises(InvalidArgument, match="KEY=VALUE"):
        enrollment_from_options("hq", ["line"])
    with pytest.raises(InvalidArgument, match="given twice"):
        enrollment_from_options("hq", ["line=a", "line=b"])


def test_malformed_enrollment_extension_is_a_configuration_error_naming_the_certificate():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "station-9")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(STATION_ENROLLMENT_OID, b"\x0c\x02hq"), critical=False)
            .sign(key, hashes.SHA256()))
    with pytest.raises(ConfigurationError, match=r"'station-9' .*malformed station enrollment"):
        enrollment_of(cert)


# -- the orchestrator's side of the hello -----------------------------------------------------

PEER = PeerIdentity("gateway", "station-1", 0xABC)
ENROLLED = Enrollment("site-a", {"line": "1"})


def test_hello_claiming_nothing_stands_where_enrolled():
    assert enrolled_place(link_pb2.GatewayHello(gateway_id="station-1"), ENROLLED, PEER) == ENROLLED
    same = link_pb2.GatewayHello(gateway_id="station-1", site="site-a", labels={"line": "1"})
    assert enrolled_place(same, ENROLLED, PEER) == ENROLLED


def test_hello_claiming_another_site_or_labels_is_refused_naming_claim_and_enrollment():
    with pytest.raises(PermissionDenied) as err:
        enrolled_place(link_pb2.GatewayHello(gateway_id="station-1", site="site-b"), ENROLLED, PEER)
    assert "claims site 'site-b'" in err.value.message and "site 'site-a', labels {line=1}" in err.value.message
    assert "serial abc" in err.value.message
    with pytest.raises(PermissionDenied, match=r"claims labels \{'line'='2'\}"):
        enrolled_place(link_pb2.GatewayHello(gateway_id="station-1", labels={"line": "2"}), ENROLLED, PEER)


def test_hello_claim_is_not_echoed_without_bound():
    huge = link_pb2.GatewayHello(gateway_id="station-1", site="s" * 45_000,
                                 labels={f"k{i}": "v" * 1000 for i in range(100)})
    with pytest.raises(PermissionDenied) as err:
        enrolled_place(huge, ENROLLED, PEER)
    assert len(err.value.message) < 1500 and "45000 characters" in err.value.message


# -- the gateway's side -----------------------------------------------------------------------

def gateway_files(pki, gateway_id: str, site: str = "", labels: dict[str, str] | None = None) -> TlsFiles:
    pki.issue("gateway", gateway_id, enrollment=check_enrollment(site, labels or {}))
    return TlsFiles(pki.ca_cert_path, pki.cert_path(gateway_id), pki.key_path(gateway_id), pki.crl_path)


def gateway_settings(tmp_path, **values) -> config.GatewaySettings:
    return config.load(config.GatewaySettings, gateway_id="station-1", data_dir=tmp_path / "gw", **values)


def test_gateway_without_configured_site_takes_the_enrolled_place(pki, tmp_path):
    files = gateway_files(pki, "station-1", "hq", {"line": "a"})
    assert station_place(gateway_settings(tmp_path), files) == Enrollment("hq", {"line": "a"})
    assert station_place(gateway_settings(tmp_path, site="hq", labels={"line": "a"}), files).site == "hq"


def test_gateway_configured_elsewhere_than_enrolled_refuses_to_start(pki, tmp_path):
    files = gateway_files(pki, "station-1", "hq", {"line": "a"})
    with pytest.raises(ConfigurationError, match=r"site 'branch' .*enrolled with site 'hq'"):
        station_place(gateway_settings(tmp_path, site="branch"), files)
    with pytest.raises(ConfigurationError, match=r"labels \{line=b\}"):
        station_place(gateway_settings(tmp_path, labels={"line": "b"}), files)


def test_insecure_gateway_has_nothing_but_its_settings(tmp_path):
    assert station_place(gateway_settings(tmp_path, site="lab", insecure=True), None) == Enrollment("lab", {})


def test_gateway_starts_from_the_enrollment_crl_and_drops_a_kept_crl_of_another_ca(pki, tmp_path):
    files = gateway_files(pki, "station-1")
    other = init_pki(tmp_path / "other")
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "crl.pem").write_bytes(other.crl_path.read_bytes())
    pki.issue("admin", "carol")
    revoked = pki.revoke("carol")
    revocations = station_revocations(gateway_settings(tmp_path), files)
    assert revocations is not None and revocations.is_revoked(revoked)
    assert (tmp_path / "gw" / "crl.pem").read_bytes() != other.crl_path.read_bytes()


def test_gateway_takes_a_crl_copied_over_its_enrollment_file_without_a_restart(pki, tmp_path):
    import asyncio

    files = gateway_files(pki, "station-1")
    copied = tmp_path / "station-1-tls" / "crl.pem"
    copied.parent.mkdir()
    copied.write_bytes(pki.crl_path.read_bytes())
    revocations = station_revocations(gateway_settings(tmp_path), TlsFiles(files.ca, files.cert, files.key, copied))
    assert revocations is not None
    pki.issue("admin", "carol")
    serial = pki.revoke("carol")

    async def follow() -> None:
        task = asyncio.create_task(follow_crl_file(copied, revocations, interval_s=0.01))
        try:
            copied.write_bytes(pki.crl_path.read_bytes())        # the operator copies the new CRL over
            async with asyncio.timeout(5):
                while not revocations.is_revoked(serial):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError("the gateway did not take the CRL copied over its enrollment's within 5 s") from None
        finally:
            task.cancel()

    asyncio.run(follow())
    assert serial in {r.serial_number for r in x509.load_pem_x509_crl((tmp_path / "gw" / "crl.pem").read_bytes())}


# -- CRLs handed over in memory ---------------------------------------------------------------

def test_revocation_list_takes_a_newer_crl_and_persists_it(pki, tmp_path):
    kept = tmp_path / "data" / "crl.pem"
    revocations = RevocationList(kept, pki.ca_cert_path.read_bytes(), missing_ok=True)
    assert revocations.der is None and not kept.exists()
    pki.issue("admin", "carol")
    serial = pki.revoke("carol")
    assert revocations.update(pki.crl_path.read_bytes(), "test") is True
    assert revocations.is_revoked(serial)
    assert RevocationList(kept, pki.ca_cert_path.read_bytes()).is_revoked(serial)   # after a restart too


def test_revocation_list_keeps_its_crl_when_offered_an_older_one(pki, tmp_path):
    older = pki.crl_path.read_bytes()
    pki.issue("admin", "carol")
    serial = pki.revoke("carol")
    revocations = RevocationList(tmp_path / "crl.pem", pki.ca_cert_path.read_bytes(), missing_ok=True)
    assert revocations.update(pki.crl_path.read_bytes(), "test") is True
    assert revocations.update(older, "a replay") is False
    assert revocations.is_revoked(serial)


def test_revocation_list_refuses_a_crl_of_another_ca(pki, tmp_path):
    other = init_pki(tmp_path / "other")
    revocations = RevocationList(tmp_path / "crl.pem", pki.ca_cert_path.read_bytes(), missing_ok=True)
    with pytest.raises(ConfigurationError, match="not signed by the CA"):
        revocations.update(other.crl_path.read_bytes(), "a stranger")
    assert revocations.der is None and not (tmp_path / "crl.pem").exists()


# -- the commands -----------------------------------------------------------------------------

def test_enroll_and_issue_commands_write_site_and_labels_into_the_gateway_certificate(pki, tmp_path):
    import typer
    from typer.testing import CliRunner

    from gateway.cli import register as register_gateway
    from shared.pki_cli import register as register_pki

    app = typer.Typer()
    register_pki(app)
    register_gateway(app)
    run = CliRunner().invoke
    directory = str(pki.directory)
    enrolled = run(app, ["gateway", "enroll", "--pki-dir", directory, "--gateway-id", "station-1", "--site", "hq",
                         "--label", "line=a", "--out", str(tmp_path / "station-1-tls")])
    assert enrolled.exit_code == 0, enrolled.output
    assert "site 'hq', labels {line=a}" in enrolled.output
    assert enrollment_of(pki.certificate("station-1")) == Enrollment("hq", {"line": "a"})
    assert (tmp_path / "station-1-tls" / "crl.pem").read_bytes() == pki.crl_path.read_bytes()
    issued = run(app, ["pki", "issue", "--pki-dir", directory, "--role", "gateway", "--name", "station-2",
                       "--site", "branch"])
    assert issued.exit_code == 0, issued.output
    assert enrollment_of(pki.certificate("station-2")) == Enrollment("branch", {})
    refused = run(app, ["pki", "issue", "--pki-dir", directory, "--role", "operator", "--name", "ops", "--site", "hq"])
    assert refused.exit_code == 1 and "only a gateway certificate" in refused.output
    bad = run(app, ["gateway", "enroll", "--pki-dir", directory, "--gateway-id", "station-3", "--label", "line",
                    "--out", str(tmp_path / "station-3-tls")])
    assert bad.exit_code == 1 and "KEY=VALUE" in bad.output and not pki.cert_path("station-3").exists()
