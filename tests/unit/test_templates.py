"""Template files: the example loads, every problem is listed with file, line and field, and
misspelled keys and names come with a suggestion."""
from __future__ import annotations

import pathlib

import pytest

from orchestrator.ca.base import EXTENDED_KEY_USAGES, KEY_USAGES
from orchestrator.domain.templates import (
    EXTENDED_KEY_USAGE_NAMES,
    KEY_USAGE_NAMES,
    CardTemplate,
    TemplatesError,
    embedded_defaults,
    load_templates,
    read_templates,
)
from shared.cards import KeyType

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "templates" / "templates.yaml"

GOOD = """\
certificate_templates:
  - name: Auth
    ca: local
    key_type: EC_P256
    validity_days: 365
    key_usage: [digitalSignature]
    extended_key_usage: [clientAuth, smartcardLogon]
    state_graph: Cert
    internal_issued_state: Issued
card_templates:
  - name: Card
    state_graph: CardGraph
    encoding: card
    produced_state: Active
    failed_state: Failed
"""


def rejected(text: str) -> list:
    with pytest.raises(TemplatesError) as err:
        load_templates(text, "t.yaml")
    assert all(v.source == "t.yaml" and v.line >= 1 for v in err.value.violations)
    return err.value.violations


def by_path(violations) -> dict:
    return {v.field_path: v for v in violations}


def test_example_loads():
    certificates, cards = load_templates(EXAMPLE.read_text(), str(EXAMPLE))
    names = {t.name: t for t in certificates}
    assert set(names) == {"EmployeeAuthentication", "EmployeeSignature", "EmployeeEncryption"}
    auth = names["EmployeeAuthentication"]
    assert (auth.ca, auth.key_type, auth.validity_days, auth.key_usage, auth.extended_key_usage) == \
        ("local", KeyType.EC_P256, 730, frozenset({"digitalSignature"}), ("clientAuth",))
    assert names["EmployeeSignature"].key_usage == frozenset({"digitalSignature", "nonRepudiation"})
    assert names["EmployeeEncryption"].key_usage == frozenset({"keyEncipherment"})
    assert {t.state_graph for t in certificates} == {"EmployeeCertificate"}
    assert {t.internal_issued_state for t in certificates} == {"Issued"}
    assert {c.name: c.encoding for c in cards} == {"EmployeeCard": "employee-card",
                                                   "EmployeeCardWithRecovery": "employee-card-with-recovery"}
    assert auth.source == str(EXAMPLE) and auth.line == 10 and auth.line_of("key_type") == 13


def test_embedded_defaults_agree_with_the_example():
    certificates, _cards = load_templates(EXAMPLE.read_text(), str(EXAMPLE))
    defaults = embedded_defaults()
    for t in certificates:
        d = defaults.certificate(t.name)
        assert (d.ca, d.key_type, d.validity_days, d.extended_key_usage, d.state_graph) == \
            (t.ca, t.key_type, t.validity_days, t.extended_key_usage, t.state_graph)
    assert defaults.card("EmployeeCard").encoding == "employee-card"


def test_usage_names_are_the_ones_the_ca_understands():
    assert set(KEY_USAGE_NAMES) == set(KEY_USAGES)
    assert set(EXTENDED_KEY_USAGE_NAMES) == set(EXTENDED_KEY_USAGES)


def test_good_file_loads_with_lines():
    certificates, cards = load_templates(GOOD, "t.yaml")
    assert certificates[0].extended_key_usage == ("clientAuth", "smartcardLogon")
    assert cards == [CardTemplate("Card", encoding="card", state_graph="CardGraph", produced_state="Active",
                                  failed_state="Failed")]
    assert cards[0].line == 11 and cards[0].line_of("failed_state") == 15


def test_unknown_keys_suggest_the_right_one():
    misspelled = GOOD.replace("    key_type:", "    keytype:").replace("card_templates:", "card_template:")
    violations = by_path(rejected(misspelled))
    assert violations["certificate_templates[0].keytype"].suggestion == "key_type"
    assert violations["certificate_templates[0].keytype"].line == 4
    assert violations["certificate_templates[0].key_type"].message == "missing required key 'key_type'"
    assert violations["card_template"].suggestion == "card_templates"
    assert "t.yaml:10: card_template: unknown key 'card_template'" in str(violations["card_template"])


def test_every_problem_of_a_file_is_listed_with_its_line():
    text = (GOOD.replace("EC_P256", "EC_P265").replace("validity_days: 365", "validity_days: -3")
            .replace("[digitalSignature]", "[digitalSignatur, keyEncipherment]")
            .replace("clientAuth,", "clientauth,").replace("ca: local", "ca: [local]"))
    violations = by_path(rejected(text))
    assert violations["certificate_templates[0].key_type"].suggestion == "EC_P256"
    assert violations["certificate_templates[0].key_type"].line == 4
    assert "between 1 and" in violations["certificate_templates[0].validity_days"].message
    assert violations["certificate_templates[0].key_usage[0]"].suggestion == "digitalSignature"
    assert violations["certificate_templates[0].extended_key_usage[0]"].suggestion == "clientAuth"
    assert violations["certificate_templates[0].ca"].message == "expected a name, found a list"
    assert len(violations) == 5


@pytest.mark.parametrize("value", ["'730'", "7.5", "true", "[1]"])
def test_validity_must_be_a_whole_number(value):
    violations = by_path(rejected(GOOD.replace("validity_days: 365", f"validity_days: {value}")))
    assert "whole number of days" in violations["certificate_templates[0].validity_days"].message


def test_duplicate_names_and_keys_are_rejected():
    text = GOOD + """\
  - name: Card
    state_graph: CardGraph
    encoding: card
    encoding: card2
    produced_state: Active
    failed_state: Active
"""
    violations = rejected(text)
    messages = [str(v) for v in violations]
    assert any("t.yaml:16: card_templates[1].name: card template 'Card' is already defined at line 11" in m
               for m in messages)
    assert any("t.yaml:19: card_templates[1].encoding: key 'encoding' appears twice (first at line 18)" in m
               for m in messages)
    assert any("failed production must not end in the produced state" in m for m in messages)


def test_missing_internal_issued_state_is_left_to_the_c14_check():
    certificates, _ = load_templates(GOOD.replace("    internal_issued_state: Issued\n", ""), "t.yaml")
    assert certificates[0].internal_issued_state == ""


@pytest.mark.parametrize("text, expected", [
    ("", "empty file"),
    ("[1, 2]", "expected a mapping"),
    ("description: nothing\n", "declares no templates"),
    ("certificate_templates: {name: x}\n", "expected a list of templates"),
    ("certificate_templates:\n  - name: [\n", "YAML syntax error"),
    ("card_templates:\n  - just a name\n", "expected a mapping"),
])
def test_malformed_files_are_located(text, expected):
    assert any(expected in v.message for v in rejected(text))


def test_read_templates_keeps_the_names_of_broken_templates():
    parsed = read_templates(GOOD.replace("validity_days: 365", "validity_days: x"), "t.yaml")
    assert parsed.certificates == () and parsed.certificate_names == {"Auth"}
    assert [c.name for c in parsed.cards] == ["Card"]
    assert len(parsed.violations) == 1
