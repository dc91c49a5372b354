"""`make demo`: one real card produced end to end on the embedded default.

An orchestrator (SQLite under var/demo/, the local CA, the configuration of examples/) and
a gateway (a fresh SoftHSM2 token, like a blank card with a transport PUK) run as separate
processes talking gRPC over mutual TLS (a development PKI under var/demo/pki: CA,
orchestrator, the client "admin", the gateway enrolled into var/demo/gateway-tls);
`cardline process start produce-employee-card` runs the example process: the user PIN is
set with the PUK, two key pairs are generated on the card, two certificates issued and
written back. The last line printed is one JSON object describing what was made, so that
`pkcs11-tool` and `sqlite3` can inspect it afterwards.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import softhsm  # noqa: E402  (what `cardline tokens init` runs)
from shared.pki import Enrollment, init_pki  # noqa: E402
from shared.proto import ca_service_pb2 as ca_pb  # noqa: E402
from shared.proto import (  # noqa: E402
    ca_service_pb2_grpc,
    card_service_pb2_grpc,
    certificate_service_pb2_grpc,
    reader_pool_service_pb2_grpc,
)
from shared.proto import card_service_pb2 as card_pb  # noqa: E402
from shared.proto import certificate_service_pb2 as certificate_pb  # noqa: E402
from shared.proto import reader_pool_service_pb2 as pool_pb  # noqa: E402
from shared.tls import TlsFiles  # noqa: E402
from shared.transport_puk import TransportPukRule, create_key_file, read_key_file  # noqa: E402

DEMO = ROOT / "var" / "demo"
CARDLINE = str(pathlib.Path(sys.executable).parent / "cardline")
TOKEN_LABEL = "cardline-demo"
EXAMPLES = ROOT / "examples"
PROCESS = "produce-employee-card"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_reader(pool: reader_pool_service_pb2_grpc.ReaderPoolServiceStub,
                    timeout_s: float = 30.0) -> pool_pb.PooledReader:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            readers = pool.ListReaders(pool_pb.ListReadersRequest(), timeout=2).readers
            for r in readers:
                if r.reader.token_label == TOKEN_LABEL:
                    return r
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("the gateway's token did not show up in the orchestrator's pool")


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "certs").mkdir(parents=True)
    config_dir = DEMO / "config"
    shutil.copytree(EXAMPLES, config_dir)
    # A blank card: its transport PUK (SO PIN) diversified for its serial from a key the card
    # template names (readable by the orchestrator only), and a transport user PIN nobody needs.
    (config_dir / "secrets").mkdir(mode=0o700)
    transport_key = create_key_file(config_dir / "secrets" / "transport-puk.key")
    user_pin = f"{secrets.randbelow(10**6):06d}"          # the PIN the employee chooses
    token = softhsm.init_token(DEMO / "softhsm", TOKEN_LABEL, TransportPukRule(read_key_file(transport_key)),
                               secrets.token_hex(4))
    conf, serial, module = token.conf_path, token.serial, token.module_path
    orch_addr, gw_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # Mutual TLS as in production: a PKI (on an admin's machine, in real life), the station
    # enrolled into a directory of its own; client commands authenticate as "admin".
    pki = init_pki(DEMO / "pki")
    pki.issue("orchestrator", "orchestrator")
    pki.issue("admin", "admin")
    # Where the station stands is enrolled in its certificate: the example process selects site hq.
    pki.issue("gateway", "demo-station", enrollment=Enrollment("hq"))
    gateway_tls, orchestrator_tls = DEMO / "gateway-tls", DEMO / "orchestrator-tls"
    pki.export("demo-station", gateway_tls)
    pki.bundle("orchestrator", orchestrator_tls)          # the orchestrator never sees the PKI's CA key
    # The card CA's key passphrase: in a file outside its directory, named (not held) by the variable.
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "CARDLINE_TLS_DIR": str(pki.directory),
           "CARDLINE_TLS_NAME": "admin", "CARDLINE_CA_PASSPHRASE_FILE": str(config_dir / "secrets" / "ca-passphrase")}
    env.pop("CARDLINE_INSECURE", None)
    logs = {name: open(DEMO / f"{name}.log", "w")  # noqa: SIM115 - the servers write to them to the end
            for name in ("orchestrator", "gateway")}
    procs = [
        subprocess.Popen([CARDLINE, "orchestrator", "serve", "--migrate", "--listen", orch_addr, "--data-dir",
                          str(DEMO / "orchestrator"), "--config-dir", str(config_dir),
                          "--tls-dir", str(orchestrator_tls)],
                         stdout=logs["orchestrator"], stderr=subprocess.STDOUT, env=env),
        subprocess.Popen([CARDLINE, "gateway", "serve", "--listen", gw_addr, "--data-dir", str(DEMO / "gateway"),
                          "--orchestrator", orch_addr, "--gateway-id", "demo-station",
                          "--pkcs11-module", module, "--no-pcsc", "--tls-dir", str(gateway_tls)],
                         stdout=logs["gateway"], stderr=subprocess.STDOUT, env=env),
    ]
    try:
        admin = TlsFiles(pki.ca_cert_path, pki.cert_path("admin"), pki.key_path("admin"))
        channel = grpc.secure_channel(orch_addr, admin.channel_credentials())
        cards = card_service_pb2_grpc.CardServiceStub(channel)
        certificates_api = certificate_service_pb2_grpc.CertificateServiceStub(channel)
        ca = ca_service_pb2_grpc.CaServiceStub(channel)
        reader = wait_for_reader(reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel))
        print(f"orchestrator {orch_addr} (pid {procs[0].pid}), gateway {gw_addr} (pid {procs[1].pid}), "
              f"mutual TLS with the PKI in {pki.directory}")
        print(f"token {TOKEN_LABEL!r} serial {serial} in reader {reader.reader.reader_id} of {reader.gateway_id}")
        print(f"process {PROCESS} (examples/processes/{PROCESS}.yaml):")
        ran = subprocess.run(
            [CARDLINE, "--tls-dir", str(pki.directory), "process", "start", PROCESS, "--orchestrator", orch_addr,
             "--input", "person=Demo Employee",
             "--secrets-stdin", "--json"], input=f"pin={user_pin}\n", capture_output=True, text=True)
        sys.stderr.write(ran.stderr)
        if ran.returncode != 0:
            print("the process failed; see var/demo/*.log", file=sys.stderr)
            return 1
        instance = json.loads(ran.stdout)
        card_id = instance["process_map"]["card"]["descriptor"]["id"]
        card = cards.GetCard(card_pb.GetCardRequest(card_id=card_id)).card
        ca_pem = DEMO / "ca.pem"
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        ca_der = ca.GetCaCertificate(ca_pb.GetCaCertificateRequest()).certificate_der
        ca_pem.write_bytes(x509.load_der_x509_certificate(ca_der).public_bytes(Encoding.PEM))
        certificates = []
        for cid in card.certificate_ids:
            cert = certificates_api.GetCertificate(certificate_pb.GetCertificateRequest(certificate_id=cid)).certificate
            pem = DEMO / "certs" / f"{cert.template}-{cert.serial_hex}.pem"
            pem.write_bytes(x509.load_der_x509_certificate(cert.der).public_bytes(Encoding.PEM))
            certificates.append({"id": cert.id, "serial": cert.serial_hex, "state": cert.state,
                                 "template": cert.template, "subject": cert.subject, "pem": str(pem)})
            print(f"  certificate {cert.template:24} serial {cert.serial_hex} state {cert.state}")
        print(f"card {card.id} serial {card.serial} state {card.state}")
        print(f"inspect: SOFTHSM2_CONF={conf} pkcs11-tool --module {module} --token-label {TOKEN_LABEL} "
              "--list-objects          (add --login for the private keys; the PIN was random)")
        db = DEMO / "orchestrator" / "cardline.db"
        print(f"         sqlite3 {db} 'select serial_hex, template, state from certificates'")
        summary = {
            "database_url": f"sqlite:///{db}", "softhsm2_conf": str(conf), "pkcs11_module": module,
            "token_label": TOKEN_LABEL, "ca_certificate": str(ca_pem), "process_instance_id": instance["id"],
            "card": {"id": card.id, "serial": card.serial, "state": card.state},
            "certificates": certificates,
        }
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
