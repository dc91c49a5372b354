"""The founding document's rules on real SoftHSM2 tokens through a gateway process, with a
real store and the local CA (or `openssl ca`): the end-to-end layer.

Every rule C1–C13 is proven fast, without hardware, in tests/rules/ (a fake gateway); this
module keeps what only a real token shows: a whole production process with SetPIN, a card
operation that finds its card by the token's serial, archived keys imported onto a second
token (recovery, CertKeyList), a stored certificate found next to its key by its public key,
data objects, and revokeOnIssue through a real `openssl ca`."""
from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import subprocess
import textwrap

import pytest

from orchestrator import app as orchestrator_app
from orchestrator.domain.processes import CoreObjectDescriptor
from shared import config
from tests.support import softhsm
from tests.support.pki import default_pki
from tests.support.processes import gateway_process
from tests.support.transport_puk import write_transport_key

pytestmark = pytest.mark.hardware
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PIN = "246810"


def config_dir(tmp_path: pathlib.Path, encodings: dict[str, str] | None = None,
               processes: dict[str, str] | None = None) -> pathlib.Path:
    """The examples plus the test's own encodings and processes."""
    target = tmp_path / "config"
    shutil.copytree(EXAMPLES, target)
    for name, text in (encodings or {}).items():
        (target / "encodings" / f"{name}.ini").write_text(textwrap.dedent(text))
    for name, text in (processes or {}).items():
        (target / "processes" / f"{name}.yaml").write_text(text)
    write_transport_key(target / "secrets")
    return target


@contextlib.asynccontextmanager
async def running(tmp_path: pathlib.Path, token, config: pathlib.Path, *, extra_tokens: int = 0, boundary=None):
    """An in-process orchestrator (so tests can look into its store and hook its step
    boundaries) and a gateway process holding `token` (plus `extra_tokens` more cards)."""
    serials = [token.serial] + [softhsm.init_blank_token(token.conf_path, f"{token.label}-{i}", token.user_pin)
                                for i in range(extra_tokens)]
    settings = config_load(tmp_path, config)
    orch = await orchestrator_app.start(settings, boundary=boundary)
    try:
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, gateway_process(
                orch.address, "station-1", tmp_path / "gateway", pkcs11_module=token.module_path,
                env=token.env, site="hq"))
            for _ in range(100):
                if {p.reader.token_serial for p in orch.pool.list()} >= set(serials):
                    break
                await asyncio.sleep(0.1)
            readers = {p.reader.token_serial: p.reader.reader_id for p in orch.pool.list()}
            yield orch, [readers[s] for s in serials]
    finally:
        await orch.stop()


def config_load(tmp_path, config_path, **overrides):
    return config.load(config.OrchestratorSettings, listen="127.0.0.1:0", data_dir=tmp_path / "orchestrator",
                       migrate=True,
                       config_dir=config_path, step_timeout_s=30, **default_pki().settings(), **overrides)


def start(orch, process: str, **inputs):
    return orch.processes.start(process, inputs)


def produce_process(name: str, reader_id: str, *, card_template: str = "EmployeeCard", fields: str = "",
                    on_error: str = "") -> str:
    """A card_production process on one reader; `fields` adds one field mapping line."""
    extra = f"\n      {fields}" if fields else ""
    return (f"name: {name}\n"
            "inputs: [person, pin]\n"
            "secret_inputs: [pin]\n"
            "tasks:\n"
            "  - type: card_production\n"
            f"    card_template: {card_template}\n"
            f"    reader: {{reader: \"{reader_id}\"}}\n"
            "    subject: \"CN=${person},O=Example\"\n"
            "    fields:\n"
            f"      USER_PIN: \"${{pin}}\"{extra}\n"
            "    card: \"${card}\"\n") + on_error


def reader_of(token) -> str:
    return f"pkcs11:softhsm2:{token.serial}"


def count(db: pathlib.Path, table: str) -> int:
    import sqlite3
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute(f"select count(*) from {table}").fetchone()[0]


# --- C1, C2, C8, C10, C12, C13 on success -----------------------------------------------------

def test_c2_c8_c12_c13_production_process_success(tmp_path, softhsm_token):
    cfg = config_dir(tmp_path, processes={"produce": produce_process(
        "produce", reader_of(softhsm_token), fields='GeneratedCertApp_A: "${theGeneratedCertificate}"')})

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _readers):
            instance = await start(orch, "produce", person="Jane Doe", pin=PIN)
            certs = orch.store.certificates.list(process_instance_id=instance.id)
            return orch, instance, certs

    orch, instance, certs = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    card = CoreObjectDescriptor.from_dict(instance.process_map["card"])           # C8: a card object was made
    generated = CoreObjectDescriptor.from_dict(instance.process_map["theGeneratedCertificate"])   # C13
    assert "pin" not in instance.process_map and "puk" not in instance.process_map and PIN not in str(instance)
    assert {c.state for c in certs} == {"Active"}                                 # C2
    assert generated.type == "Certificate" and generated.id in {c.id for c in certs}
    relations = {r.target_id: r.relation_type for r in orch.store.relations.list(source_id=card.id)}
    by_template = {c.template: c.id for c in certs}
    assert relations == {by_template["EmployeeAuthentication"]: "HAS_A",          # C12: ObjectRelationType
                         by_template["EmployeeSignature"]: "HAS_CERTIFICATE"}     # C12: configured default
    assert orch.store.cards.get(card.id).state == "Active"


# --- C8, C10: a card operation on the produced card ------------------------------------------

OPERATION_ENCODING = """\
    [Encoding]
    Type=Chip

    [Fields]
    USER_PIN=
    NewCert=

    [Description]
    PIN=USER_PIN

    [Application_A]
    GenerateKeyPair=EC_P256
    CertificateTemplate=EmployeeAuthentication
    CreateObjectRelation={relation}
    CertCoreObjectDescriptorReturnField=NewCert
"""


def operation_process(reader_id: str, with_card: bool) -> str:
    return ("name: operate\n"
            f"inputs: {'[card, pin]' if with_card else '[pin]'}\n"
            "secret_inputs: [pin]\n"
            "tasks:\n"
            "  - type: card_operation\n"
            "    encoding: operation\n"
            f"    reader: {{reader: \"{reader_id}\"}}\n"
            "    subject: \"CN=Operator Test\"\n"
            "    fields: {USER_PIN: \"${pin}\", NewCert: \"${newCert}\"}\n"
            + ("    card: \"${card}\"\n" if with_card else ""))


def test_c8_c10_operation_on_the_produced_card_of_the_process_map_relates_on_success(tmp_path, softhsm_token):
    """A card is produced, then a card operation runs on it (the card in the process map,
    matched to the token by its serial)."""
    cfg = config_dir(tmp_path, encodings={"operation": OPERATION_ENCODING.format(relation="success")},
                     processes={"produce": produce_process("produce", reader_of(softhsm_token),
                                                           fields='GeneratedCertApp_A: "${x}"'),
                                "operate": operation_process(reader_of(softhsm_token), with_card=True)})

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await start(orch, "produce", person="Jane Doe", pin=PIN)
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            cards_before = count(tmp_path / "orchestrator" / "cardline.db", "cards")
            operated = await start(orch, "operate", card=card, pin=PIN)
            cards_after = count(tmp_path / "orchestrator" / "cardline.db", "cards")
            return orch, card, operated, cards_before, cards_after

    orch, card, operated, cards_before, cards_after = asyncio.run(body())
    assert operated.state == "SUCCEEDED", operated.error_message
    assert cards_after == cards_before                                   # C8: an operation makes no card
    new = CoreObjectDescriptor.from_dict(operated.process_map["newCert"])
    related = {r.target_id for r in orch.store.relations.list(source_id=card.id)}
    assert new.id in related                                             # C10
    assert orch.store.certificates.get(new.id).state == "Active"


# --- C7 recovery ------------------------------------------------------------------------------

RECOVERY_PROCESS = """\
name: recover
inputs: [old, pin]
secret_inputs: [pin]
tasks:
  - type: card_operation
    encoding: recover-only
    reader: {{reader: "{reader}"}}
    subject: "CN=Recovery"
    fields: {{USER_PIN: "${{pin}}", OldEncryptionCert: "${{old}}"}}
"""
RECOVERY_ENCODING = """\
    [Encoding]
    Type=Chip

    [Fields]
    USER_PIN=
    OldEncryptionCert=

    [Description]
    PIN=USER_PIN

    [Application_A]
    RecoverCertificate=OldEncryptionCert
    KeyLabel=Encryption (previous)
    CreateObjectRelation=never
"""


def test_c7_recovery_writes_archived_key_to_another_card_without_storing_again(tmp_path, softhsm_token):
    archive_encoding = OPERATION_ENCODING.format(relation="success").replace(
        "GenerateKeyPair=EC_P256\n    CertificateTemplate=EmployeeAuthentication",
        "ArchiveKey=true\n    CertificateTemplate=EmployeeEncryption")
    cfg = config_dir(tmp_path, encodings={"operation": archive_encoding, "recover-only": RECOVERY_ENCODING},
                     processes={"operate": operation_process(reader_of(softhsm_token), with_card=False)})

    async def body():
        async with running(tmp_path, softhsm_token, cfg, extra_tokens=1) as (orch, readers):
            archived = await start(orch, "operate", pin=softhsm_token.user_pin)
            return orch, readers, archived

    orch, readers, archived = asyncio.run(body())
    assert archived.state == "SUCCEEDED", archived.error_message
    old = CoreObjectDescriptor.from_dict(archived.process_map["newCert"])
    assert orch.store.archived_keys.get(old.id).wrapped_key                # the key is archived, sealed
    second = readers[1]
    (cfg / "processes" / "recover.yaml").write_text(RECOVERY_PROCESS.format(reader=second))

    async def recover():
        async with running(tmp_path, softhsm_token, cfg) as (orch2, _):
            certs_before = count(tmp_path / "orchestrator" / "cardline.db", "certificates")
            instance = await start(orch2, "recover", old=old, pin=softhsm_token.user_pin)
            certs_after = count(tmp_path / "orchestrator" / "cardline.db", "certificates")
            return orch2, instance, certs_before, certs_after

    orch2, instance, before, after = asyncio.run(recover())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert after == before                                               # C7: never stored again
    record = orch2.store.certificates.get(old.id)
    assert record.state == "Active"                                      # C7: state untouched
    assert [a.action for a in orch2.store.audit.list(object_id=old.id)] == ["recover"]
    listing = subprocess.run(["pkcs11-tool", "--module", softhsm_token.module_path, "--token-label",
                              f"{softhsm_token.label}-0", "--login", "--pin", softhsm_token.user_pin, "--list-objects"],
                             env=softhsm_token.env, capture_output=True, text=True, check=True).stdout
    assert "Encryption (previous)" in listing and "Private Key Object" in listing


# --- C7 with a key list, C6 through openssl ca, WriteCertificate ------------------------------

KEY_LIST_ENCODING = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=
Certs=

[Description]
PIN=USER_PIN

[Application_A]
WriteCertKeyList=true
CertKeyList=Certs
KeyLabel=Archived
"""


def test_c7_cert_key_list_writes_every_archived_pair_without_touching_the_store(tmp_path, softhsm_token):
    archive_encoding = OPERATION_ENCODING.format(relation="success").replace(
        "GenerateKeyPair=EC_P256\n    CertificateTemplate=EmployeeAuthentication",
        "ArchiveKey=true\n    CertificateTemplate=EmployeeEncryption")
    cfg = config_dir(tmp_path, encodings={"operation": archive_encoding, "key-list": KEY_LIST_ENCODING},
                     processes={"operate": operation_process(reader_of(softhsm_token), with_card=False)})

    async def archive_two():
        async with running(tmp_path, softhsm_token, cfg, extra_tokens=1) as (orch, readers):
            made = [await start(orch, "operate", pin=softhsm_token.user_pin) for _ in range(2)]
            return readers, made

    readers, made = asyncio.run(archive_two())
    assert [m.state for m in made] == ["SUCCEEDED", "SUCCEEDED"]
    archived = [CoreObjectDescriptor.from_dict(m.process_map["newCert"]) for m in made]
    (cfg / "processes" / "restore.yaml").write_text(
        "name: restore\ninputs: [certs, pin]\nsecret_inputs: [pin]\ntasks:\n  - type: card_operation\n"
        f"    encoding: key-list\n    reader: {{reader: \"{readers[1]}\"}}\n"
        "    fields: {USER_PIN: \"${pin}\", Certs: \"${certs}\"}\n")

    async def restore():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            states = {d.id: orch.store.certificates.get(d.id).state for d in archived}
            instance = await start(orch, "restore", certs=archived, pin=softhsm_token.user_pin)
            return orch, instance, states

    orch, instance, states_before = asyncio.run(restore())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert {d.id: orch.store.certificates.get(d.id).state for d in archived} == states_before
    listing = subprocess.run(["pkcs11-tool", "--module", softhsm_token.module_path, "--token-label",
                              f"{softhsm_token.label}-0", "--login", "--pin", softhsm_token.user_pin,
                              "--list-objects", "--type", "cert"],
                             env=softhsm_token.env, capture_output=True, text=True, check=True).stdout
    assert listing.count("Certificate Object") == 2


def test_c6_revoke_on_issue_through_openssl_ca_shows_certificate_hold_in_its_crl(tmp_path, softhsm_token):
    """The same rule with a real `openssl ca` behind the template: its own CRL, read by
    `openssl crl -text`, lists the new certificate with reason Certificate Hold."""
    cfg = config_dir(tmp_path, encodings={"operation": OPERATION_ENCODING.format(relation="success").replace(
        "CreateObjectRelation=success", "CreateObjectRelation=success\n    revokeOnIssue=true")},
        processes={"operate": operation_process(reader_of(softhsm_token), with_card=False)})
    templates = cfg / "templates" / "templates.yaml"
    text = templates.read_text()
    at = text.index("- name: EmployeeAuthentication")
    templates.write_text(text[:at] + text[at:].replace("ca: local", "ca: corp", 1))
    ca_dir = tmp_path / "openssl-ca"

    async def body():
        settings = config_load(tmp_path, cfg, cas=[{"name": "corp", "kind": "openssl", "directory": str(ca_dir)}])
        orch = await orchestrator_app.start(settings)
        try:
            with contextlib.ExitStack() as stack:
                await asyncio.to_thread(stack.enter_context, gateway_process(
                    orch.address, "station-1", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                    env=softhsm_token.env))
                while not orch.pool.list():
                    await asyncio.sleep(0.1)
                instance = await start(orch, "operate", pin=softhsm_token.user_pin)
                return orch, instance, orch.cas["corp"].crl_der()
        finally:
            await orch.stop()

    orch, instance, crl = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    cert = orch.store.certificates.get(CoreObjectDescriptor.from_dict(instance.process_map["newCert"]).id)
    assert cert.ca_name == "corp" and cert.state == "Active"            # the store follows C1/C2
    (tmp_path / "crl.der").write_bytes(crl)
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    serial = cert.serial_hex.upper().zfill(len(cert.serial_hex) + len(cert.serial_hex) % 2)
    entry = text[text.index(f"Serial Number: {serial}"):].split("Serial Number:")[1]
    assert "Certificate Hold" in entry
    assert (ca_dir / "index.txt").read_text().count("\n") == 1            # one line: issued once, now on hold


REWRITE_ENCODING = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=
Cert=
BADGE=

[Description]
PIN=USER_PIN

[Application_A]
WriteCertificate=true
Certificate=Cert
KeyLabel=Rewritten
CreateObjectRelation=never

[Application_B]
DataObject=employee-number:E-0042
LabelExpressionDataObject=badge-${BADGE}:issued
AttributesDataObject=application=hr;label=department;value=R and D;private=true
"""


def test_write_certificate_and_data_objects_on_a_card_in_use(tmp_path, softhsm_token):
    """WriteCertificate puts a stored certificate next to its key already on the card (found
    by its public key; the store state is untouched); the three data object keywords write
    their objects."""
    cfg = config_dir(tmp_path, encodings={"operation": OPERATION_ENCODING.format(relation="success"),
                                          "rewrite": REWRITE_ENCODING},
                     processes={"operate": operation_process(reader_of(softhsm_token), with_card=False),
                                "rewrite": "name: rewrite\ninputs: [cert, badge, pin]\nsecret_inputs: [pin]\n"
                                           "tasks:\n  - type: card_operation\n    encoding: rewrite\n"
                                           f"    reader: {{reader: \"{reader_of(softhsm_token)}\"}}\n"
                                           "    fields: {USER_PIN: \"${pin}\", Cert: \"${cert}\", "
                                           "BADGE: \"${badge}\"}\n"})

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            made = await start(orch, "operate", pin=softhsm_token.user_pin)
            cert = CoreObjectDescriptor.from_dict(made.process_map["newCert"])
            rewritten = await start(orch, "rewrite", cert=cert, badge="7", pin=softhsm_token.user_pin)
            return orch, cert, rewritten

    orch, cert, rewritten = asyncio.run(body())
    assert rewritten.state == "SUCCEEDED", rewritten.error_message
    assert orch.store.certificates.get(cert.id).state == "Active"
    listing = subprocess.run(["pkcs11-tool", "--module", softhsm_token.module_path, "--token-label",
                              softhsm_token.label, "--login", "--pin", softhsm_token.user_pin, "--list-objects"],
                             env=softhsm_token.env, capture_output=True, text=True, check=True).stdout
    assert listing.count("Certificate Object") == 1 and "label:      Rewritten" in listing
    for label in ("employee-number", "badge-7", "department"):
        assert label in listing
