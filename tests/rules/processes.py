"""Process definitions and encoding descriptions the rule tests run (YAML and INI text)."""
from __future__ import annotations

RETURN_FIELD = 'GeneratedCertApp_A: "${theGeneratedCertificate}"'


def produce_process(name: str = "produce", *, reader: str = "{site: hq}", fields: str = RETURN_FIELD,
                    on_error: str = "", card_template: str = "EmployeeCard") -> str:
    """A card_production of the EmployeeCard template (examples/encodings/employee-card.ini:
    SetPIN, Application_A always/HAS_A/return field, Application_B defaults)."""
    extra = f"\n      {fields}" if fields else ""
    return (f"name: {name}\n"
            "inputs: [person, pin]\n"
            "secret_inputs: [pin]\n"
            "tasks:\n"
            "  - type: card_production\n"
            f"    card_template: {card_template}\n"
            f"    reader: {reader}\n"
            "    subject: \"CN=${person},O=Example\"\n"
            "    fields:\n"
            f"      USER_PIN: \"${{pin}}\"{extra}\n"
            "    card: \"${card}\"\n") + on_error


HANDLE_GENERATED_ON_ERROR = """\
on_error:
  - type: handle_issued
    certificates: "${theGeneratedCertificate}"
    revoke_reason: cessationOfOperation
    target_state: Revoked
"""

HANDLE_ALL_ON_ERROR = """\
on_error:
  - type: handle_issued
    revoke_reason: cessationOfOperation
    target_state: Revoked
"""


def operation_encoding(relation: str | None = "success", *, relation_type: str | None = None,
                       revoke_on_issue: bool = False, return_field: bool = True,
                       issue: str = "GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication") -> str:
    """One application issuing a certificate; `relation` None leaves CreateObjectRelation out."""
    lines = ["[Encoding]", "Type=Chip", "", "[Fields]", "USER_PIN=", "NewCert=", "", "[Description]",
             "PIN=USER_PIN", "", "[Application_A]", issue]
    if relation is not None:
        lines.append(f"CreateObjectRelation={relation}")
    if relation_type:
        lines.append(f"ObjectRelationType={relation_type}")
    if revoke_on_issue:
        lines.append("revokeOnIssue=true")
    if return_field:
        lines.append("CertCoreObjectDescriptorReturnField=NewCert")
    return "\n".join(lines) + "\n"


ARCHIVED_ENCRYPTION = "ArchiveKey=true\nCertificateTemplate=EmployeeEncryption"


def operation_process(name: str = "operate", *, encoding: str = "operation", with_card: bool,
                      reader: str = "{site: hq}", on_error: str = "") -> str:
    return (f"name: {name}\n"
            f"inputs: {'[card, pin]' if with_card else '[pin]'}\n"
            "secret_inputs: [pin]\n"
            "tasks:\n"
            "  - type: card_operation\n"
            f"    encoding: {encoding}\n"
            f"    reader: {reader}\n"
            "    subject: \"CN=Operator Test\"\n"
            "    fields: {USER_PIN: \"${pin}\", NewCert: \"${newCert}\"}\n"
            + ("    card: \"${card}\"\n" if with_card else "") + on_error)


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
CreateObjectRelation={relation}
"""


def recovery_process(reader: str, *, with_card: bool) -> str:
    return ("name: recover\n"
            f"inputs: {'[old, card, pin]' if with_card else '[old, pin]'}\n"
            "secret_inputs: [pin]\n"
            "tasks:\n"
            "  - type: card_operation\n"
            "    encoding: recover-only\n"
            f"    reader: {reader}\n"
            "    subject: \"CN=Recovery\"\n"
            "    fields: {USER_PIN: \"${pin}\", OldEncryptionCert: \"${old}\"}\n"
            + ("    card: \"${card}\"\n" if with_card else ""))


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


def key_list_process(reader: str) -> str:
    return ("name: restore\ninputs: [certs, pin]\nsecret_inputs: [pin]\ntasks:\n  - type: card_operation\n"
            f"    encoding: key-list\n    reader: {reader}\n"
            "    fields: {USER_PIN: \"${pin}\", Certs: \"${certs}\"}\n")


def reader_of(token) -> str:
    return f'{{reader: "{token.reader_id}"}}'
