"""`cardline gateway ...` and `cardline tokens ...` commands."""
from __future__ import annotations

import json
import pathlib
import sys

import typer

from shared import config
from shared.cli import run_server
from shared.pki_cli import INSECURE, LABEL, SITE, TLS_CA, TLS_CERT, TLS_CRL, TLS_DIR, TLS_KEY
from shared.serials import show_serial
from shared.transport_puk import DEFAULT_LENGTH, DIGITS


def register(root: typer.Typer) -> None:
    gateway = typer.Typer(help="A gateway: card I/O next to the readers.", no_args_is_help=True)

    @gateway.command("serve")
    def serve(
        listen: str | None = typer.Option(None, help="HOST:PORT for the gateway's own gRPC service."),
        data_dir: pathlib.Path | None = typer.Option(None, help="Directory for the gateway's state."),
        orchestrator: list[str] | None = typer.Option(
            None, help="HOST:PORT of an orchestrator to dial out to: repeatable, or several separated by commas; "
                       "tried in order, the next when one fails (docs/operator-guide.md)."),
        gateway_id: str | None = typer.Option(None, help="Name of this gateway in the pool (default: host name)."),
        site: str | None = typer.Option(None, help="Site of this gateway: over TLS the enrolled one decides and this "
                                                    "must equal it if given; only --insecure takes it as is."),
        pkcs11_module: list[pathlib.Path] | None = typer.Option(None, help="PKCS#11 module to load (repeatable)."),
        pcsc: bool | None = typer.Option(None, "--pcsc/--no-pcsc", help="Watch PC/SC readers through pcscd."),
        config_file: pathlib.Path | None = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                                                           help="YAML configuration file (section 'gateway')."),
        json_logs: bool = typer.Option(False, "--json-logs", help="Log JSON lines (every line, libraries' too)."),
        log_level: str | None = typer.Option(None, help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL."),
        metrics_listen: str | None = typer.Option(None, help="HOST:PORT to serve Prometheus metrics on "
                                                              "(/metrics); default: none."),
        tls_dir: pathlib.Path | None = TLS_DIR, tls_ca: pathlib.Path | None = TLS_CA,
        tls_cert: pathlib.Path | None = TLS_CERT, tls_key: pathlib.Path | None = TLS_KEY,
        tls_crl: pathlib.Path | None = TLS_CRL, insecure: bool | None = INSECURE,
    ) -> None:
        """Serve card I/O and keep the link to the orchestrator (mutual TLS unless --insecure)."""
        from gateway.app import serve as run

        run_server(config.GatewaySettings, run, json_logs=json_logs, log_level=log_level,
                   metrics_listen=metrics_listen, config_file=config_file, listen=listen,
                   data_dir=data_dir, orchestrator=orchestrator or None, gateway_id=gateway_id, site=site,
                   pkcs11_modules=pkcs11_module or None, pcsc=pcsc, tls_dir=tls_dir, tls_ca=tls_ca,
                   tls_cert=tls_cert, tls_key=tls_key, tls_crl=tls_crl, insecure=insecure)

    @gateway.command("enroll")
    def enroll(
        pki_dir: pathlib.Path = typer.Option(...,
                                             help="The PKI directory (`cardline pki init`), on the admin's machine."),
        gateway_id: str = typer.Option(..., help="The new station's gateway id (its certificate's CN)."),
        out: pathlib.Path = typer.Option(..., help="Directory to write ca.crt, ID.crt and ID.key to."),
        name: list[str] = typer.Option([], "--name", help="Host name or IP clients reach the station's own "
                                                           "GatewayService by (repeatable)."),
        site: str | None = SITE, label: list[str] = LABEL,
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
    ) -> None:
        """Give a new station its certificate (with its site and labels), key, the CA
        certificate and the current CRL in one directory: copy it to the station and start
        `cardline gateway serve --gateway-id ID --tls-dir DIR`."""
        from shared.errors import CardlineError
        from shared.pki import Enrollment, Pki, enrollment_from_options

        try:
            pki = Pki.open(pki_dir)
            enrollment = enrollment_from_options(site, label) or Enrollment()
            issued = pki.issue("gateway", gateway_id, name, enrollment=enrollment)
            files = pki.export(gateway_id, out)
        except CardlineError as exc:
            typer.echo(f"error {exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from None
        if json_output:
            typer.echo(json.dumps({"gateway_id": gateway_id, "serial": show_serial(format(issued.serial, "x")),
                                   "site": enrollment.site, "labels": dict(enrollment.labels),
                                   "files": {k: str(v) for k, v in files.items()}}, indent=2))
            return
        typer.echo(f"gateway {gateway_id}: serial {show_serial(format(issued.serial, 'x'))}, "
                   f"{enrollment.describe()}")
        for path in files.values():
            typer.echo(f"  {path}")
        typer.echo(f"on the station: cardline gateway serve --gateway-id {gateway_id} --tls-dir {out} "
                   "--orchestrator HOST:PORT")

    root.add_typer(gateway, name="gateway")
    root.add_typer(_tokens(), name="tokens")


def _tokens() -> typer.Typer:
    tokens = typer.Typer(help="Software tokens (SoftHSM2) for stations without card hardware.",
                         no_args_is_help=True)

    @tokens.command("new-transport-key")
    def new_transport_key(
        path: pathlib.Path = typer.Argument(..., help="The key file to create (mode 0600; never overwritten)."),
    ) -> None:
        """Create a transport PUK key: blank cards initialised with it (--transport-puk-key) get
        a PUK of their own, which the orchestrator derives from the same file."""
        from shared.errors import CardlineError
        from shared.transport_puk import create_key_file

        try:
            create_key_file(path)
        except CardlineError as exc:
            typer.echo(f"error {exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"transport PUK key written to {path}; give it to the orchestrator's secrets_dir and to "
                   "whoever initialises blank cards, nobody else")

    @tokens.command("init")
    def init(
        softhsm_dir: pathlib.Path = typer.Option(..., "--softhsm-dir", help="Token directory (created if "
                                                 "missing): DIR/tokens and DIR/softhsm2.conf."),
        label: str = typer.Option(..., help="The new token's label (1-32 bytes)."),
        pins_file: pathlib.Path | None = typer.Option(
            None, help="File whose first two lines are the SO PIN and the user PIN ('-': standard input); "
                       "with --transport-puk-key, its first line is the user PIN. Without it they are asked "
                       "for, hidden, on a terminal."),
        transport_puk_key: pathlib.Path | None = typer.Option(
            None, help="A blank card: the SO PIN is the transport PUK diversified for the new token's serial "
                       "from this key file (the card template's transport_puk_key_file)."),
        puk_alphabet: str = typer.Option(DIGITS, help="With --transport-puk-key: the card template's "
                                         "transport_puk_alphabet."),
        puk_length: int = typer.Option(DEFAULT_LENGTH, help="With --transport-puk-key: the card template's "
                                       "transport_puk_length."),
        json_output: bool = typer.Option(False, "--json", help="JSON output."),
    ) -> None:
        """Create a SoftHSM2 token; prints its serial and the SOFTHSM2_CONF a gateway needs.
        The PINs are never taken from the command line or the environment."""
        from gateway.softhsm import init_token
        from shared.errors import CardlineError
        from shared.transport_puk import TransportPukRule, read_key_file

        try:
            so_pin: str | TransportPukRule
            if transport_puk_key is not None:
                so_pin = TransportPukRule(read_key_file(transport_puk_key), puk_alphabet, puk_length)
                user_pin = _read_user_pin(pins_file)
            else:
                so_pin, user_pin = _read_pins(pins_file)
            token = init_token(softhsm_dir, label, so_pin, user_pin)
        except CardlineError as exc:
            typer.echo(f"error {exc.reason}: {exc.message}", err=True)
            raise typer.Exit(1) from None
        if json_output:
            typer.echo(json.dumps({"label": token.label, "serial": token.serial, "softhsm2_conf": str(token.conf_path),
                                   "module": str(token.module_path)}, indent=2))
            return
        typer.echo(f"token {token.label!r}: serial {token.serial}")
        typer.echo(f"SOFTHSM2_CONF={token.conf_path}")
        typer.echo(f"on the station: SOFTHSM2_CONF={token.conf_path} cardline gateway serve "
                   f"--pkcs11-module {token.module_path} ...")

    return tokens


def _read_user_pin(pins_file: pathlib.Path | None) -> str:
    """The user PIN: the first line of the file or standard input ('-'), or a hidden prompt."""
    from shared.errors import ConfigurationError

    if pins_file is None and sys.stdin.isatty():
        return str(typer.prompt("User PIN", hide_input=True, confirmation_prompt=True))
    lines = _read_pin_lines(pins_file)
    if not lines or not lines[0]:
        raise ConfigurationError(f"{_pins_source(pins_file)} must hold the user PIN on its first line")
    return lines[0]


def _pins_source(pins_file: pathlib.Path | None) -> str:
    return "standard input" if pins_file is None or str(pins_file) == "-" else str(pins_file)


def _read_pin_lines(pins_file: pathlib.Path | None) -> list[str]:
    from shared.errors import ConfigurationError

    where = _pins_source(pins_file)
    try:
        text = sys.stdin.read() if where == "standard input" else pathlib.Path(where).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the PINs from {where}: {exc}") from None
    return text.splitlines()


def _read_pins(pins_file: pathlib.Path | None) -> tuple[str, str]:
    """(SO PIN, user PIN) from the file, standard input ('-'), or hidden prompts on a terminal."""
    from shared.errors import ConfigurationError

    if pins_file is None and sys.stdin.isatty():
        so_pin = typer.prompt("SO PIN", hide_input=True, confirmation_prompt=True)
        user_pin = typer.prompt("User PIN", hide_input=True, confirmation_prompt=True)
        return so_pin, user_pin
    where = _pins_source(pins_file)
    lines = _read_pin_lines(pins_file)
    if len(lines) < 2 or not lines[0] or not lines[1]:
        raise ConfigurationError(f"{where} must hold the SO PIN and the user PIN on its first two lines")
    return lines[0], lines[1]
