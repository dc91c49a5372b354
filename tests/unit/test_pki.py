"""The development PKI (shared/pki.py) and the TLS file resolution (shared/tls.py)."""
from __future__ import annotations

import ipaddress
import json
import pathlib
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from shared.errors import AlreadyExists, ConfigurationError, InvalidArgument
from shared.pki import CLIENT_ROLES, Pki, crl_number, init_pki, load_crl, role_of
from shared.tls import RevocationList, client_tls, resolve


@pytest.fixture
def pki(tmp_path) -> Pki:
    return init_pki(tmp_path / "pki")


def test_ca_key_is_encrypted_at_rest_and_secrets_are_0600(pki):
    assert (pki.directory.stat().st_mode & 0o777) == 0o700
    for name in ("ca.key", "ca.pass"):
        assert (pki.directory / name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):           # no password: refused
        serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), password=None)
    ca = pki.ca_certificate()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_refuses_a_directory_that_already_holds_a_ca(pki):
    with pytest.raises(AlreadyExists):
        init_pki(pki.directory)


def test_server_certificate_carries_role_name_and_host_names(pki):
    issued = pki.issue("orchestrator", "orchestrator", ["orch.example", "10.0.0.7"])
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    assert role_of(cert) == "orchestrator"
    assert cert.subject.rfc4514_string() == "CN=orchestrator,OU=orchestrator,O=cardline"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "orchestrator", "orch.example"}
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku
    cert.verify_directly_issued_by(pki.ca_certificate())


def test_leaf_key_is_unencrypted_pkcs8_with_mode_0600(pki):
    issued = pki.issue("operator", "alice")
    assert issued.key_path.stat().st_mode & 0o777 == 0o600
    pem = issued.key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")           # PKCS#8, what gRPC loads
    serialization.load_pem_private_key(pem, password=None)
    cert = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    assert role_of(cert) == "operator"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("role", sorted(CLIENT_ROLES))
def test_client_certificates_get_no_host_names(pki, role):
    with pytest.raises(InvalidArgument):
        pki.issue(role, "bob", ["bob.example"])


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "-x", "ca", "crl", "x" * 65])
def test_bad_names_are_refused(pki, name):
    with pytest.raises(InvalidArgument):
        pki.issue("admin", name)


def test_unknown_role_is_refused_naming_the_valid_ones(pki):
    # "client" was the catch-all role before admin, operator, auditor and service
    with pytest.raises(InvalidArgument, match="role 'client': expected one of admin, operator, auditor, service, "
                                              "gateway, orchestrator"):
        pki.issue("client", "x")


def test_a_name_is_issued_once_until_revoked(pki):
    first = pki.issue("gateway", "station-1")
    with pytest.raises(AlreadyExists, match="revoke it first"):
        pki.issue("gateway", "station-1")
    assert pki.revoke("station-1") == first.serial
    second = pki.issue("gateway", "station-1")
    assert second.serial != first.serial


def test_revocation_is_recorded_in_revoked_json_and_a_signed_crl(pki):
    issued = pki.issue("gateway", "station-2")
    pki.revoke("station-2")
    pki.revoke("station-2")                                        # twice is harmless
    entries = json.loads(pki.revoked_path.read_text())["revoked"]
    assert [(e["serial"], e["name"], e["role"]) for e in entries] == [(f"{issued.serial:x}", "station-2", "gateway")]
    assert load_crl(pki.crl_path, pki.ca_certificate()) == {issued.serial}
    assert not list(pki.directory.glob(".*"))                       # no temporary files left behind


def test_crl_of_another_ca_is_rejected(pki, tmp_path):
    other = init_pki(tmp_path / "other")
    with pytest.raises(ConfigurationError, match="not signed by the CA"):
        load_crl(other.crl_path, pki.ca_certificate())


def test_revocation_list_is_reread_when_the_crl_changes(pki):
    issued = pki.issue("gateway", "station-3")
    revocations = RevocationList(pki.crl_path, pki.ca_cert_path.read_bytes())
    assert not revocations.is_revoked(issued.serial)
    pki.revoke("station-3")
    assert revocations.is_revoked(issued.serial)


def test_export_gives_a_station_exactly_its_files_and_the_crl(pki, tmp_path):
    pki.issue("gateway", "station-4")
    files = pki.export("station-4", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ca.crt", "crl.pem", "station-4.crt",
                                                                     "station-4.key"]
    assert files["crl"].read_bytes() == pki.crl_path.read_bytes()
    assert files["key"].stat().st_mode & 0o777 == 0o600


def test_resolve_lists_everything_missing_and_names_the_way_out(tmp_path):
    with pytest.raises(ConfigurationError) as err:
        resolve("orchestrator", "orchestrator")
    text = err.value.message
    assert "CA certificate" in text and "certificate" in text and "private key" in text and "--insecure" in text
    with pytest.raises(ConfigurationError, match=r"orchestrator.key: .*does not exist|orchestrator.key does not exist"):
        resolve("orchestrator", "orchestrator", tls_dir=tmp_path)


def test_resolve_checks_the_role_in_the_certificate(pki):
    pki.issue("admin", "admin")
    with pytest.raises(ConfigurationError, match=r"role 'admin'.*needs role 'orchestrator'"):
        resolve("orchestrator", "admin", tls_dir=pki.directory, role="orchestrator")
    files = resolve("client", "admin", tls_dir=pki.directory, role="admin")
    assert files is not None and files.crl == pki.crl_path


def test_client_commands_take_a_certificate_of_any_client_role_but_not_a_servers(pki, monkeypatch):
    monkeypatch.delenv("CARDLINE_INSECURE", raising=False)
    pki.issue("auditor", "ann")
    pki.issue("gateway", "station-1")
    files = client_tls(tls_dir=pki.directory, name="ann")
    assert files is not None and files.cert.name == "ann.crt"
    with pytest.raises(ConfigurationError, match=r"role 'gateway'.*needs role 'admin' or 'auditor' or 'operator' "
                                                 r"or 'service'"):
        client_tls(tls_dir=pki.directory, name="station-1")


def test_insecure_resolves_to_plaintext(tmp_path):
    assert resolve("orchestrator", "orchestrator", insecure=True) is None
    assert client_tls(insecure=True) is None


def test_client_without_tls_dir_is_told_how_to_get_one(monkeypatch):
    monkeypatch.delenv("CARDLINE_TLS_DIR", raising=False)
    monkeypatch.delenv("CARDLINE_INSECURE", raising=False)
    with pytest.raises(ConfigurationError, match="--tls-dir"):
        client_tls()


def test_pki_commands_init_issue_revoke_and_list(tmp_path):
    import typer
    from typer.testing import CliRunner

    from shared.pki_cli import register

    app = typer.Typer()
    register(app)
    run = CliRunner().invoke
    directory = str(tmp_path / "pki")
    made = run(app, ["pki", "init", "--pki-dir", directory, "--orchestrator-name", "orch.example"])
    assert made.exit_code == 0, made.output
    assert {"ca.crt", "ca.key", "ca.pass", "orchestrator.crt", "orchestrator.key", "admin.crt", "admin.key",
            "crl.pem"} <= {p.name for p in (tmp_path / "pki").iterdir()}
    assert run(app, ["pki", "init", "--pki-dir", directory]).exit_code == 1          # never overwrites a CA
    assert run(app, ["pki", "issue", "--pki-dir", directory, "--role", "operator", "--name", "ops"]).exit_code == 0
    admin = x509.load_pem_x509_certificate((tmp_path / "pki" / "admin.crt").read_bytes())
    assert role_of(admin) == "admin"
    wrong = run(app, ["pki", "issue", "--pki-dir", directory, "--role", "client", "--name", "x"])
    assert wrong.exit_code == 1
    assert "role 'client': expected one of admin, operator, auditor, service, gateway, orchestrator" in wrong.output
    assert run(app, ["pki", "revoke", "--pki-dir", directory, "--name", "ops"]).exit_code == 0
    listing = run(app, ["pki", "list", "--pki-dir", directory]).output
    assert "ops" in listing and "revoked" in listing and "orchestrator" in listing
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "orchestrator.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "orch.example" in san.get_values_for_type(x509.DNSName)


def test_pki_init_gives_the_orchestrator_a_bundle_without_the_ca_key(tmp_path):
    """`cardline pki init` keeps the TLS CA's key and passphrase apart from what the orchestrator
    is given: its bundle holds ca.crt, crl.pem and its own certificate and key, nothing else,
    and later revocations reach the bundle's crl.pem."""
    import typer
    from typer.testing import CliRunner

    from shared.pki_cli import register

    app = typer.Typer()
    register(app)
    directory, bundle = tmp_path / "admin" / "pki", tmp_path / "server" / "orchestrator-tls"
    made = CliRunner().invoke(app, ["pki", "init", "--pki-dir", str(directory), "--orchestrator-dir", str(bundle)])
    assert made.exit_code == 0, made.output
    assert f"--tls-dir {bundle}" in made.output
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "crl.pem", "orchestrator.crt", "orchestrator.key"]
    ca_key, passphrase = (directory / "ca.key").read_bytes(), (directory / "ca.pass").read_bytes().strip()
    assert not any(ca_key in p.read_bytes() or passphrase in p.read_bytes() for p in bundle.iterdir())
    assert oct(bundle.stat().st_mode & 0o777) == "0o700" and oct((bundle / "orchestrator.key").stat().st_mode
                                                                & 0o777) == "0o600"
    resolved = resolve("orchestrator", "orchestrator", tls_dir=bundle, role="orchestrator")
    assert resolved is not None and resolved.crl is not None    # the server checks revocations from its bundle
    pki = Pki.open(directory)
    ops = pki.issue("operator", "ops")
    pki.revoke("ops")
    assert ops.serial in load_crl(bundle / "crl.pem", pki.ca_certificate())


def test_pki_init_default_bundle_is_the_orchestrator_subdirectory(tmp_path):
    pki = init_pki(tmp_path / "pki")
    pki.issue("orchestrator", "orchestrator")
    with pytest.raises(InvalidArgument, match="apart from the PKI directory"):
        pki.bundle("orchestrator", tmp_path / "pki")
    files = pki.bundle("orchestrator", tmp_path / "pki" / "orchestrator")
    assert {p.name for p in files.values()} == {"ca.crt", "crl.pem", "orchestrator.crt", "orchestrator.key"}


def test_concurrent_revocations_from_two_processes_lose_none_and_crl_numbers_only_grow(tmp_path):
    # Two processes revoking at once (two administrators, or a script run twice): each reads,
    # changes and rewrites revoked.json; under the PKI's lock no revocation is lost, and every
    # CRL written has a larger number than the one before, even within one millisecond.
    pki = init_pki(tmp_path / "pki")
    names = [f"op-{i}" for i in range(16)]
    serials = {pki.issue("operator", name).serial for name in names}
    script = ("import sys\nfrom shared.pki import Pki, crl_number\nfrom cryptography import x509\n"
              "pki = Pki.open(sys.argv[1])\nfor name in sys.argv[2:]:\n"
              "    pki.revoke(name)\n"
              "    print(crl_number(x509.load_pem_x509_crl(pki.crl_path.read_bytes())))\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(pki.directory), *names[i::2]],
                                stdout=subprocess.PIPE, text=True, cwd=pathlib.Path(__file__).parents[2])
               for i in range(2)]
    numbers = [int(line) for w in workers for line in w.communicate(timeout=120)[0].split()]
    assert [w.returncode for w in workers] == [0, 0]
    assert pki.revoked_serials() == serials
    assert load_crl(pki.crl_path, pki.ca_certificate()) == serials
    assert len(set(numbers)) == len(names)                     # no two CRLs share a number
    before = crl_number(x509.load_pem_x509_crl(pki.crl_path.read_bytes()))
    pki.write_crl()
    pki.write_crl()
    assert crl_number(x509.load_pem_x509_crl(pki.crl_path.read_bytes())) >= before + 2
