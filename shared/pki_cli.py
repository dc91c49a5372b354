"""`cardline pki ...`: the development PKI of cardline's own connections (shared/pki.py).

The PKI directory holds the CA key: in a real deployment it lives on the administrator's
machine (or better, an offline one); stations receive only their own certificate, key and
the CA certificate (`cardline gateway enroll`).
"""
from __future__ import annotations

import json
import pathlib

import typer

from shared.errors import CardlineError
from shared.pki import ROLES, Pki, enrollment_from_options, init_pki, role_of
from shared.serials import show_serial

DIR = typer.Option(..., "--pki-dir", "--dir", help="The PKI directory (holds the CA key: keep it on the admin's "
                                                  "machine; --dir: old name).")
JSON = typer.Option(False, "--json", help="JSON output.")
#: A gateway's enrollment: where the station stands, written into its certificate (docs/stations.md).
SITE = typer.Option(None, "--site", help="A gateway's site, enrolled in its certificate (reader selectors match it).")
LABEL = typer.Option([], "--label", help="A gateway's label KEY=VALUE, enrolled in its certificate (repeatable).")


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2))


def _fail(exc: CardlineError) -> typer.Exit:
    typer.echo(f"error {exc.reason}: {exc.message}", err=True)
    return typer.Exit(1)


def register(root: typer.Typer) -> None:
    pki = typer.Typer(help="Development PKI for mutual TLS between orchestrator, gateways and clients (one role "
                           "per certificate, docs/permissions.md).",
                      no_args_is_help=True)

    @pki.command("init")
    def init(
        directory: pathlib.Path = DIR,
        orchestrator_name: list[str] = typer.Option([], "--orchestrator-name",
                                                    help="Host name or IP the orchestrator is reached by, besides "
                                                         "localhost and 127.0.0.1 (repeatable)."),
        orchestrator_dir: pathlib.Path | None = typer.Option(
            None, help="The orchestrator's bundle: ca.crt, crl.pem, orchestrator.crt/.key and no CA key; its "
                       "--tls-dir. Default: PKI_DIR/orchestrator."),
        json_output: bool = JSON,
    ) -> None:
        """Create a CA, the orchestrator's server certificate and bundle, and a certificate 'admin' of role admin."""
        bundle_dir = orchestrator_dir or directory / "orchestrator"
        try:
            created = init_pki(directory)
            orch = created.issue("orchestrator", "orchestrator", orchestrator_name)
            admin = created.issue("admin", "admin")
            created.bundle("orchestrator", bundle_dir)
        except CardlineError as exc:
            raise _fail(exc) from None
        if json_output:
            _print_json({"ca": str(created.ca_cert_path), "crl": str(created.crl_path),
                         "orchestrator": {"cert": str(orch.cert_path), "key": str(orch.key_path),
                                          "tls_dir": str(bundle_dir)},
                         "admin": {"cert": str(admin.cert_path), "key": str(admin.key_path)}})
            return
        typer.echo(f"CA            {created.ca_cert_path}  (key {directory / 'ca.key'}, encrypted; passphrase in "
                   f"{directory / 'ca.pass'})")
        typer.echo(f"orchestrator  {orch.cert_path}  {orch.key_path}")
        typer.echo(f"admin         {admin.cert_path}  {admin.key_path}")
        typer.echo(f"CRL           {created.crl_path}")
        typer.echo(f"orchestrator's own files (no CA key): {bundle_dir}")
        typer.echo(f"next: cardline orchestrator serve --tls-dir {bundle_dir}\n"
                   f"      cardline gateway enroll --pki-dir {directory} --gateway-id STATION --site SITE --out DIR\n"
                   f"      cardline --tls-dir {directory} readers")

    @pki.command("issue")
    def issue(
        directory: pathlib.Path = DIR,
        role: str = typer.Option(..., help=f"{', '.join(ROLES)}: what the certificate may call "
                                           "(docs/permissions.md)."),
        name: str = typer.Option(..., help="The certificate's CN (a gateway's CN is its gateway id)."),
        san: list[str] = typer.Option([], "--san", help="Extra host name or IP of a server certificate (repeatable)."),
        site: str | None = SITE, label: list[str] = LABEL,
        json_output: bool = JSON,
    ) -> None:
        """Issue NAME.crt / NAME.key (the key is unencrypted PEM, mode 0600: gRPC needs it so)."""
        try:
            issued = Pki.open(directory).issue(role, name, san, enrollment=enrollment_from_options(site, label))
        except CardlineError as exc:
            raise _fail(exc) from None
        if json_output:
            _print_json({"role": issued.role, "name": issued.name, "cert": str(issued.cert_path),
                         "key": str(issued.key_path), "serial": show_serial(format(issued.serial, "x"))})
            return
        typer.echo(f"{issued.role} {issued.name}: {issued.cert_path} {issued.key_path} "
                   f"(serial {show_serial(format(issued.serial, 'x'))})")

    @pki.command("revoke")
    def revoke(directory: pathlib.Path = DIR, name: str = typer.Option(..., help="Whose certificate."),
               json_output: bool = JSON) -> None:
        """Revoke NAME's certificate: revoked.json and crl.pem are rewritten; servers reading
        that CRL refuse it from their next call on."""
        try:
            opened = Pki.open(directory)
            serial = opened.revoke(name)
        except CardlineError as exc:
            raise _fail(exc) from None
        if json_output:
            _print_json({"name": name, "serial": show_serial(format(serial, "x")), "crl": str(opened.crl_path)})
            return
        typer.echo(f"revoked {name} (serial {show_serial(format(serial, 'x'))}); CRL {opened.crl_path}")

    @pki.command("list")
    def list_(directory: pathlib.Path = DIR, json_output: bool = JSON) -> None:
        """Every certificate of the PKI with role, serial, expiry and revocation."""
        try:
            opened = Pki.open(directory)
            revoked = opened.revoked_serials()
        except CardlineError as exc:
            raise _fail(exc) from None
        rows = []
        for path in sorted(directory.glob("*.crt")):
            if path.name == "ca.crt":
                continue
            cert = opened.certificate(path.stem)
            rows.append({"name": path.stem, "role": role_of(cert) or "",
                         "serial": show_serial(format(cert.serial_number, "x")),
                         "not_after": cert.not_valid_after_utc.isoformat(),
                         "state": "revoked" if cert.serial_number in revoked else "valid"})
        if json_output:
            _print_json(rows)
            return
        for r in rows:
            typer.echo(f"{r['name']:24} {r['role'] or '-':12} {r['serial']}  until {r['not_after'][:10]}  {r['state']}")

    root.add_typer(pki, name="pki")


# Options of the serve commands (orchestrator and gateway); None leaves the environment and
# the YAML file in charge (settings tls_dir, tls_ca, tls_cert, tls_key, tls_crl, insecure).
TLS_DIR = typer.Option(None, "--tls-dir", help="Directory with ca.crt, NAME.crt, NAME.key (NAME: orchestrator, or the "
                                               "gateway id) and optionally crl.pem.")
TLS_CA = typer.Option(None, "--tls-ca", help="CA certificate (PEM) trusted for peers; overrides --tls-dir.")
TLS_CERT = typer.Option(None, "--tls-cert", help="This process's certificate (PEM); overrides --tls-dir.")
TLS_KEY = typer.Option(None, "--tls-key", help="Its private key (unencrypted PEM, mode 0600); overrides --tls-dir.")
TLS_CRL = typer.Option(None, "--tls-crl", help="CRL (PEM) of revoked peer certificates, re-read when it changes.")
INSECURE = typer.Option(None, "--insecure", help="Plaintext gRPC without authentication: development only.")
