"""Encoding descriptions: parser, model and the C13 field-mapping check (pure code)."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.domain.encoding import (
    Application,
    CreateObjectRelation,
    EncodingError,
    application_order_key,
    check_field_mapping,
    load_encoding,
    parse_apdu_script,
    parse_encoding,
    process_variable_of,
)
from orchestrator.domain.violations import Violation
from shared.cards import Apdu, KeyType

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "encodings"
TEMPLATES = {"EmployeeAuthentication", "EmployeeSignature", "EmployeeEncryption"}

HEAD = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=
GeneratedCertApp_A=
OLD_CERT=
"""


def parse(text: str, templates=TEMPLATES):
    return parse_encoding(text, "card.ini", templates)


def violations(text: str, templates=TEMPLATES) -> list[Violation]:
    with pytest.raises(EncodingError) as info:
        parse(text, templates)
    return info.value.violations


def app(body: str, name: str = "Application_A") -> Application:
    return parse(HEAD + f"[{name}]\n" + body).applications[0]


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if fragment in line)


# -- the examples ------------------------------------------------------------------------

def test_founding_document_sample_parses_to_its_model():
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    assert enc.encoding_type == "Chip"
    assert enc.field_names == ("USER_PIN", "GeneratedCertApp_A")
    assert enc.description.set_pin and enc.description.pin_field == "USER_PIN"
    a, b = enc.applications
    assert (a.name, a.generate_key_pair, a.certificate_template, a.key_label) == \
        ("Application_A", KeyType.EC_P256, "EmployeeAuthentication", "Authentication")
    assert a.revoke_on_issue is False
    assert a.create_object_relation is CreateObjectRelation.ALWAYS
    assert a.object_relation_type == "HAS_A"
    assert a.return_field == "GeneratedCertApp_A"
    assert (b.generate_key_pair, b.certificate_template) == (KeyType.RSA_2048, "EmployeeSignature")
    assert b.create_object_relation is CreateObjectRelation.SUCCESS
    assert b.object_relation_type is None and b.return_field is None
    assert enc.warnings == ()
    assert enc.return_fields() == ("GeneratedCertApp_A",)
    assert enc.input_fields() == ("USER_PIN",)


def test_recovery_example_parses_with_archival_and_recovery():
    enc = load_encoding(EXAMPLES / "employee-card-with-recovery.ini", TEMPLATES)
    archived, recovered = enc.applications[1], enc.applications[2]
    assert archived.archive_key and archived.generate_key_pair is None and archived.issues_certificate
    assert recovered.is_recovery and not recovered.issues_certificate
    assert recovered.recover_certificate_field == "OldEncryptionCert"
    assert enc.warnings == ()


# -- order ----------------------------------------------------------------------------------

def test_applications_run_in_order_of_their_suffix():
    text = HEAD + "".join(f"[Application_{x}]\nDataObject=d{x}\n" for x in ("C", "10", "A", "2", "B"))
    assert [a.suffix for a in parse(text).applications] == ["2", "10", "A", "B", "C"]


def test_application_order_is_natural_and_total():
    suffixes = ["b", "A", "Z", "AA", "a", "x10", "x9", "1_2", "1_10"]
    ordered = sorted(suffixes, key=application_order_key)
    assert ordered == ["1_2", "1_10", "A", "a", "AA", "b", "x9", "x10", "Z"]


# -- C6, C9-C13 keywords ----------------------------------------------------------------

def test_c10_create_object_relation_defaults_to_success():
    a = app("GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n")
    assert a.create_object_relation is CreateObjectRelation.SUCCESS


@pytest.mark.parametrize("value, expected", [("always", CreateObjectRelation.ALWAYS),
                                             ("success", CreateObjectRelation.SUCCESS),
                                             ("never", CreateObjectRelation.NEVER)])
def test_c9_c11_create_object_relation_values(value, expected):
    a = app(f"GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n"
            f"CreateObjectRelation={value}\n")
    assert a.create_object_relation is expected


def test_c9_create_object_relation_value_is_case_sensitive_with_suggestion():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "CreateObjectRelation=Always\n"
    [v] = violations(text)
    assert v.line == line_of(text, "CreateObjectRelation")
    assert v.field_path == "Application_A.CreateObjectRelation"
    assert "did you mean 'always'" in v.message


def test_c12_object_relation_type_is_optional():
    a = app("GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\nObjectRelationType=HAS_A\n")
    assert a.object_relation_type == "HAS_A"


def test_c12_object_relation_type_with_never_warns():
    a_text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                    "CreateObjectRelation=never\nObjectRelationType=HAS_A\n"
    [w] = parse(a_text).warnings
    assert w.field_path == "Application_A.ObjectRelationType" and "never" in w.message


def test_c6_revoke_on_issue_is_a_boolean_of_the_application():
    a = app("GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\nrevokeOnIssue=true\n")
    assert a.revoke_on_issue is True
    assert app("GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n").revoke_on_issue is False


def test_booleans_accept_any_case_but_nothing_else():
    assert app("GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\nrevokeOnIssue=TRUE\n") \
        .revoke_on_issue is True
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "revokeOnIssue=yes\n"
    [v] = violations(text)
    assert "true or false" in v.message


def test_c13_return_field_not_declared_is_rejected_with_line():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "CertCoreObjectDescriptorReturnField=GeneratedCertApp_B\n"
    [v] = violations(text)
    assert v.source == "card.ini"
    assert v.line == line_of(text, "CertCoreObjectDescriptorReturnField")
    assert v.field_path == "Application_A.CertCoreObjectDescriptorReturnField"
    assert "'GeneratedCertApp_B' is not declared in [Fields]" in v.message
    assert "did you mean 'GeneratedCertApp_A'" in v.message


def test_c13_return_field_mapped_to_process_variable_is_accepted():
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    assert check_field_mapping(enc, {"USER_PIN": "${pin}", "GeneratedCertApp_A": "${theGeneratedCertificate}"},
                               "process.yaml") == []
    # an input may also be a literal
    assert check_field_mapping(enc, {"USER_PIN": "123456", "GeneratedCertApp_A": "${c}"}, "p.yaml") == []


@pytest.mark.parametrize("expr", ["theGeneratedCertificate", "$theGeneratedCertificate",
                                  "{theGeneratedCertificate}", "${ theGeneratedCertificate }",
                                  "${the-cert}", "${1cert}", "prefix ${cert}", ""])
def test_c13_return_field_not_mapped_to_process_variable_is_rejected(expr):
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    lines = {"USER_PIN": 7, "GeneratedCertApp_A": 8}
    [v] = check_field_mapping(enc, {"USER_PIN": "${pin}", "GeneratedCertApp_A": expr}, "process.yaml",
                              line_of=lines.__getitem__)
    assert (v.source, v.line, v.field_path) == ("process.yaml", 8, "fields.GeneratedCertApp_A")
    assert "process variable" in v.message


def test_c13_return_field_missing_from_mapping_is_rejected():
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    [v] = check_field_mapping(enc, {"USER_PIN": "${pin}"}, "process.yaml")
    assert "GeneratedCertApp_A" in v.message and "not mapped" in v.message
    assert v.line == 0 and str(v).startswith("process.yaml: fields.GeneratedCertApp_A: ")


def test_c13_mapping_suggests_the_dollar_brace_form():
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    [v] = check_field_mapping(enc, {"USER_PIN": "${pin}", "GeneratedCertApp_A": "$theCert"}, "p.yaml")
    assert "did you mean '${theCert}'" in v.message


def test_c13_two_return_fields_cannot_write_one_variable():
    text = HEAD + "R2=\n" + \
        "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
        "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A\n" \
        "[Application_B]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeSignature\n" \
        "CertCoreObjectDescriptorReturnField=R2\n"
    enc = parse(text)
    [v] = check_field_mapping(enc, {"GeneratedCertApp_A": "${c}", "R2": "${c}"}, "p.yaml")
    assert "both write process variable 'c'" in v.message


def test_input_fields_must_be_mapped_to_something():
    text = HEAD + "[Description]\nSetPIN=true\nPIN=USER_PIN\n[Application_A]\nRecoverCertificate=OLD_CERT\n"
    enc = parse(text)
    found = check_field_mapping(enc, {"USER_PIN": "  "}, "p.yaml")
    assert {v.field_path for v in found} == {"fields.USER_PIN", "fields.OLD_CERT"}
    assert check_field_mapping(enc, {"USER_PIN": "${pin}", "OLD_CERT": "${old}"}, "p.yaml") == []


def test_mapping_of_undeclared_field_is_rejected_with_suggestion():
    enc = load_encoding(EXAMPLES / "employee-card.ini", TEMPLATES)
    found = check_field_mapping(enc, {"USER_PIN": "${pin}", "GeneratedCertApp_A": "${c}", "USER_PN": "x"}, "p.yaml")
    [v] = found
    assert v.field_path == "fields.USER_PN" and "did you mean 'USER_PIN'" in v.message


@pytest.mark.parametrize("expr, name", [("${pin}", "pin"), ("${_a1}", "_a1"), ("${a.b}", None),
                                        ("${}", None), ("pin", None), ("${pin}x", None), (" ${pin}", None)])
def test_process_variable_of(expr, name):
    assert process_variable_of(expr) == name


# -- C7 recovery and archival -------------------------------------------------------------

def test_c7_return_field_on_recovery_warns():
    text = HEAD + "[Application_A]\nRecoverCertificate=OLD_CERT\n" \
                  "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A\n"
    enc = parse(text)
    [w] = enc.warnings
    assert w.line == line_of(text, "CertCoreObjectDescriptorReturnField")
    assert "C7" in w.message and "no effect" in w.message
    # and a recovery's return field is neither returned nor demanded in the mapping
    assert enc.return_fields() == ()
    assert check_field_mapping(enc, {"OLD_CERT": "${old}"}, "p.yaml") == []


def test_c7_recovery_cannot_be_combined_with_issuance():
    text = HEAD + "[Application_A]\nRecoverCertificate=OLD_CERT\nGenerateKeyPair=EC_P256\n" \
                  "CertificateTemplate=EmployeeAuthentication\n"
    [v] = violations(text)
    assert v.field_path == "Application_A.RecoverCertificate"
    assert "GenerateKeyPair, CertificateTemplate" in v.message


def test_c7_recover_certificate_field_must_be_declared():
    text = HEAD + "[Application_A]\nRecoverCertificate=OLD_CRT\n"
    [v] = violations(text)
    assert "did you mean 'OLD_CERT'" in v.message


def test_archive_key_is_incompatible_with_generate_key_pair():
    text = HEAD + "[Application_A]\nArchiveKey=true\nGenerateKeyPair=RSA_2048\nCertificateTemplate=EmployeeEncryption\n"
    [v] = violations(text)
    assert v.field_path == "Application_A.ArchiveKey" and "GenerateKeyPair" in v.message


def test_archive_key_needs_a_certificate_template():
    [v] = violations(HEAD + "[Application_A]\nArchiveKey=true\n")
    assert "CertificateTemplate" in v.message


def test_certificate_template_needs_a_key():
    [v] = violations(HEAD + "[Application_A]\nCertificateTemplate=EmployeeEncryption\n")
    assert v.field_path == "Application_A.CertificateTemplate" and "needs a key" in v.message


# -- errors: located, suggested, all of them -----------------------------------------------

def test_unknown_keyword_names_file_line_and_suggestion():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "CreateObjectRelaton=always\n"
    [v] = violations(text)
    assert str(v) == (f"card.ini:{line_of(text, 'Relaton')}: Application_A.CreateObjectRelaton: "
                      "unknown keyword 'CreateObjectRelaton' in [Application_A] "
                      "(did you mean 'CreateObjectRelation'?)")


def test_unknown_keyword_differing_only_in_case_is_rejected_with_suggestion():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "RevokeOnIssue=true\n"
    [v] = violations(text)
    assert "did you mean 'revokeOnIssue'" in v.message


def test_keyword_in_the_wrong_section_says_where_it_belongs():
    [v] = violations(HEAD + "[Application_A]\nDataObject=x\nPIN=USER_PIN\n")
    assert "belongs in [Description]" in v.message


def test_unknown_certificate_template_is_rejected_with_suggestion():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuth\n"
    [v] = violations(text)
    assert str(v) == (f"card.ini:{line_of(text, 'EmployeeAuth')}: Application_A.CertificateTemplate: "
                      "unknown certificate template 'EmployeeAuth' (did you mean 'EmployeeAuthentication'?)")


def test_certificate_templates_are_not_checked_without_a_set():
    a = parse(HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=Anything\n", None)
    assert a.applications[0].certificate_template == "Anything"


def test_every_violation_listed_not_only_the_first():
    text = """\
[Encoding]
Type=chip
[Fields]
USER_PIN=
[Description]
SetPIN=maybe
PIN=USER_PN
[Application_A]
GenerateKeyPair=EC_P265
CertificateTemplate=EmployeeAuth
CreateObjectRelaton=always
[Application_B]
KeyLabel=nothing else
[Aplication_C]
DataObject=x
"""
    found = violations(text)
    assert [(v.line, v.field_path) for v in found] == [
        (2, "Encoding.Type"), (6, "Description.SetPIN"), (7, "Description.PIN"),
        (9, "Application_A.GenerateKeyPair"), (10, "Application_A.CertificateTemplate"),
        (11, "Application_A.CreateObjectRelaton"), (12, "Application_B"), (14, "Aplication_C")]
    assert "did you mean 'Chip'" in found[0].message
    assert "did you mean 'Application_C'" in found[-1].message
    assert all(v.source == "card.ini" for v in found)


def test_encoding_error_message_lists_every_violation():
    with pytest.raises(EncodingError) as info:
        parse("[Encoding]\nType=Chip\n[Application_A]\nFoo=1\nBar=2\n")
    assert str(info.value).count("card.ini:") == 2


@pytest.mark.parametrize("text, fragment", [
    ("[Encoding]\nType=Chip\n[Application_A]\nDataObject=x\n[Application_A]\nDataObject=y\n", "appears twice"),
    ("[Encoding]\nType=Chip\nType=Chip\n[Application_A]\nDataObject=x\n", "given twice"),
    ("Type=Chip\n[Encoding]\nType=Chip\n[Application_A]\nDataObject=x\n", "outside any section"),
    ("[Encoding\nType=Chip\n", "malformed section header"),
    ("[Encoding]\nType Chip\n", "expected key=value"),
    ("[Encoding]\nType=\n", "needs a value"),
    ("[Fields]\nX=\n", "missing [Encoding]"),
    ("[Encoding]\nType=Print\n", "unknown encoding type 'Print'"),
    ("[Encoding]\nType=Chip\n", "does nothing"),
    ("[Encoding]\nType=Chip\n[Fields]\n1X=\n[Application_A]\nDataObject=x\n", "invalid field name"),
    ("[Encoding]\nType=Chip\n[Fields]\nX=1\n[Application_A]\nDataObject=x\n", "takes no value"),
    ("[Encoding]\nType=Chip\n[Description]\nSetPIN=true\n", "needs PIN"),
    ("[Encoding]\nType=Chip\n[Application_A]\nWriteCertificate=true\n", "needs Certificate"),
    ("[Encoding]\nType=Chip\n[Application_A]\nWriteCertKeyList=true\n", "needs CertKeyList"),
    ("[Encoding]\nType=Chip\n[Application_A]\nKeyLabel=x\n", "does nothing"),
    ("[Encoding]\nType=Chip\n[Application A]\nDataObject=x\n", "did you mean 'Application_A'"),
])
def test_malformed_descriptions_are_rejected_with_a_located_reason(text, fragment):
    found = violations(text)
    assert any(fragment in v.message for v in found), found
    n_lines = len(text.split("\n"))
    assert all(1 <= v.line <= n_lines for v in found)


def test_comments_blank_lines_crlf_and_bom_are_accepted():
    text = ("\ufeff# comment\r\n; another\r\n\r\n[Encoding]\r\n  Type = Chip  \r\n"
            "[Application_A]\r\nDataObject=a # b ; c\r\n")
    enc = parse(text)
    assert enc.applications[0].data_object == "a # b ; c"      # no inline comments


def test_keyword_lines_are_kept_for_later_errors():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "revokeOnIssue=true\n"
    a = parse(text).applications[0]
    assert a.line_of("revokeOnIssue") == line_of(text, "revokeOnIssue")
    assert a.line_of("KeyLabel") == a.line == line_of(text, "[Application_A]")


def test_no_effect_keywords_warn():
    text = HEAD + "[Application_A]\nDataObject=x\nKeyLabel=k\nCreateObjectRelation=always\nCertificate=OLD_CERT\n"
    enc = parse(text)
    assert [w.field_path for w in enc.warnings] == [
        "Application_A.KeyLabel", "Application_A.CreateObjectRelation", "Application_A.Certificate"]


def test_pins_are_field_names_only():
    enc = parse(HEAD + "[Description]\nSetPIN=true\nPIN=USER_PIN\nInitialPUK=USER_PIN\n")
    assert enc.description.pin_field == enc.description.initial_puk_field == "USER_PIN"


def test_write_certificate_and_cert_key_list_and_data_objects():
    a = app("WriteCertificate=true\nCertificate=OLD_CERT\nWriteCertKeyList=true\nCertKeyList=OLD_CERT\n"
            "DataObject=label=Employee;value=42\nLabelExpressionDataObject=${name}\n"
            "AttributesDataObject=CKA_LABEL=x\n")
    assert (a.write_certificate, a.certificate_field, a.write_cert_key_list, a.cert_key_list_field) == \
        (True, "OLD_CERT", True, "OLD_CERT")
    assert a.data_object == "label=Employee;value=42"
    assert a.label_expression_data_object == "${name}" and a.attributes_data_object == "CKA_LABEL=x"
    assert a.puts_certificate_on_card and not a.issues_certificate


# -- APDU scripts --------------------------------------------------------------------------

def test_apdu_script_inline_is_parsed_with_status_word_patterns():
    a = app("ApduScript=00A4040007A0000000010101/9000;00B0000000/9000,61XX;00 20 00 80\n")
    assert a.apdus == (Apdu(bytes.fromhex("00A4040007A0000000010101"), ("9000",)),
                       Apdu(bytes.fromhex("00B0000000"), ("9000", "61XX")),
                       Apdu(bytes.fromhex("00200080"), ("9000",)))
    assert a.apdu_script_field is None


def test_apdu_script_may_name_a_field():
    text = HEAD.replace("USER_PIN=", "USER_PIN=\nSCRIPT=") + "[Application_A]\nApduScript=SCRIPT\n"
    enc = parse(text)
    assert enc.applications[0].apdu_script_field == "SCRIPT" and enc.applications[0].apdus == ()
    assert "SCRIPT" in enc.input_fields()


def test_apdu_script_naming_an_undeclared_field_is_rejected():
    [v] = violations(HEAD + "[Application_A]\nApduScript=MY_SCRIPT\n")
    assert "not declared in [Fields]" in v.message


@pytest.mark.parametrize("script, fragment", [
    ("00A4", "at least CLA INS P1 P2"),
    ("00A404000AA000", "Lc=10"),
    ("00A4040", "even number of hex digits"),
    ("0060000000", "INS 60 is invalid"),
    ("00B0000000/90", "status word pattern '90'"),
    ("00B0000000/9G00", "status word pattern"),
    (";", "empty"),
    ("00B0000000;;00B0000000", "command 2 is empty"),
])
def test_apdu_script_structure_is_validated(script, fragment):
    with pytest.raises(ValueError) as info:
        parse_apdu_script(script)
    assert fragment in str(info.value)
    [v] = violations(HEAD + f"[Application_A]\nApduScript={script}\n")
    assert v.field_path == "Application_A.ApduScript" and fragment in v.message


def test_apdu_script_reports_every_bad_command():
    with pytest.raises(ValueError) as info:
        parse_apdu_script("00A4;00B0000000/9000;00A404000AA000")
    assert "command 1" in str(info.value) and "command 3" in str(info.value)


def test_apdu_script_accepts_extended_length_and_trailing_semicolon():
    apdus = parse_apdu_script("00B0000000FFFF;00DA000000000201020000;")
    assert [len(a.command) for a in apdus] == [7, 11]


def test_load_encoding_rejects_non_utf8(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_bytes(b"[Encoding]\nType=\xff\n")
    with pytest.raises(EncodingError) as info:
        load_encoding(path)
    [v] = info.value.violations
    assert v.source == str(path) and v.line == 1


def test_c13_one_return_field_serves_one_application():
    text = HEAD + "[Application_A]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeAuthentication\n" \
                  "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A\n" \
                  "[Application_B]\nGenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeSignature\n" \
                  "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A\n"
    [v] = violations(text)
    assert v.field_path == "Application_B.CertCoreObjectDescriptorReturnField"
    assert v.line == len(text.split("\n")) - 1 and "Application_A" in v.message
