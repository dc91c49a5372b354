"""Process definitions (YAML), `${name}` expressions and the process map."""
from __future__ import annotations

import json
import pathlib
import textwrap
from collections import ChainMap

import pytest

from orchestrator.domain.processes import (
    CardOperationTask,
    CardProductionTask,
    ChangeStateInCaTask,
    ChangeStateTask,
    CoreObjectDescriptor,
    ExpressionError,
    HandleIssuedTask,
    MissingVariable,
    ProcessError,
    ProcessMap,
    SecretInProcessMap,
    load_process,
    render,
    variable_of,
    variables_in,
)
from shared.cards import ReaderKind

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "processes"
TEMPLATES = {"EmployeeCard", "VisitorCard"}
STATES = {"Issued", "Active", "OnHold", "Revoked", "Suspended"}

VALID = """\
name: produce-employee-card
inputs: [person, pin]
secret_inputs: [pin]
tasks:
  - type: card_production
    card_template: EmployeeCard
    reader: {gateway: station-1, site: hq, labels: {line: a}, kind: pkcs11}
    subject: "CN=${person},O=Example"
    fields: {USER_PIN: "${pin}", GeneratedCertApp_A: "${theGeneratedCertificate}"}
  - type: change_state
    certificates: "${theGeneratedCertificate}"
    state: OnHold
    reason: suspended
on_error:
  - type: handle_issued
    certificates: "${theGeneratedCertificate}"
    revoke_reason: cessationOfOperation
    target_state: Revoked
"""


def load(text: str, **kwargs):
    kwargs.setdefault("known_card_templates", TEMPLATES)
    kwargs.setdefault("known_states", STATES)
    return load_process(textwrap.dedent(text), "p.yaml", **kwargs)


def rejected(text: str, **kwargs) -> list:
    with pytest.raises(ProcessError) as info:
        load(text, **kwargs)
    assert info.value.violations, "a ProcessError always lists at least one violation"
    return list(info.value.violations)


def only(violations: list, path: str):
    hits = [v for v in violations if v.field_path == path]
    assert len(hits) == 1, f"expected one violation at {path}, got {violations}"
    return hits[0]


# -- loading ------------------------------------------------------------------------------

def test_valid_definition_loads_into_typed_tasks():
    definition = load(VALID)
    assert definition.name == "produce-employee-card"
    assert definition.source == "p.yaml"
    assert definition.inputs == ("person", "pin")
    assert definition.secret_inputs == ("pin",)
    production, change = definition.tasks
    assert isinstance(production, CardProductionTask) and production.type == "card_production"
    assert production.line == 5
    assert production.card_template == "EmployeeCard"
    assert production.reader.gateway == "station-1" and production.reader.site == "hq"
    assert production.reader.labels == {"line": "a"} and production.reader.kind is ReaderKind.PKCS11
    assert production.subject == "CN=${person},O=Example"
    assert production.fields == {"USER_PIN": "${pin}", "GeneratedCertApp_A": "${theGeneratedCertificate}"}
    assert production.field_lines == {"USER_PIN": 9, "GeneratedCertApp_A": 9}
    assert change == ChangeStateTask(line=10, certificates="theGeneratedCertificate", state="OnHold",
                                     reason="suspended")
    (handle,) = definition.on_error
    assert handle == HandleIssuedTask(line=15, certificates="theGeneratedCertificate",
                                      revoke_reason="cessationOfOperation", target_state="Revoked")


def test_definition_is_frozen():
    definition = load(VALID)
    with pytest.raises(AttributeError):
        definition.name = "other"
    with pytest.raises(TypeError):
        definition.tasks[0].fields["USER_PIN"] = "1234"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load_cleanly(path):
    definition = load_process(path.read_text(), str(path), known_card_templates={"EmployeeCard", "TemporaryCard"})
    assert definition.tasks


def test_examples_are_the_ones_the_docs_promise():
    produce = load_process((EXAMPLES / "produce-employee-card.yaml").read_text(), "produce",
                           known_card_templates={"EmployeeCard"})
    production, handling = produce.tasks[0], produce.on_error[0]
    assert isinstance(production, CardProductionTask) and isinstance(handling, HandleIssuedTask)
    assert production.fields["GeneratedCertApp_A"] == "${theGeneratedCertificate}"
    assert handling.certificates == "theGeneratedCertificate"
    assert handling.revoke_reason
    renew = load_process((EXAMPLES / "renew-authentication.yaml").read_text(), "renew",
                         known_card_templates={"EmployeeCard"})
    assert isinstance(renew.tasks[0], CardOperationTask) and renew.tasks[0].card == "card"


def test_all_task_types_load():
    definition = load("""\
        name: all
        inputs: [card, certs]
        tasks:
          - type: card_operation
            encoding: RenewAuthentication
            card: "${card}"
          - type: change_state
            card: "${card}"
            state: Suspended
          - type: change_state_in_ca
            certificates: "${certs}"
            state: OnHold
          - type: handle_issued
            target_state: Revoked
        """)
    operation, change, in_ca, handle = definition.tasks
    assert operation == CardOperationTask(line=4, encoding="RenewAuthentication", card="card")
    assert change.card == "card" and change.certificates is None
    assert in_ca == ChangeStateInCaTask(line=10, certificates="certs", state="OnHold")
    assert handle.certificates is None and handle.revoke_reason is None
    assert definition.on_error == ()


def test_null_values_count_as_absent():
    definition = load("""\
        name: p
        inputs:
        tasks:
          - type: card_production
            card_template: EmployeeCard
            fields:
        on_error:
        """)
    assert definition.inputs == () and definition.on_error == ()
    assert definition.tasks[0].fields == {}


# -- located violations ---------------------------------------------------------------------

def test_yaml_syntax_error_is_located():
    (violation,) = rejected("name: p\ntasks:\n  - type: [unclosed\n")
    assert violation.source == "p.yaml"
    assert violation.line >= 3
    assert "YAML syntax error" in violation.message


def test_empty_file_is_rejected_at_line_one():
    (violation,) = rejected("")
    assert violation.line == 1 and "empty" in violation.message


def test_top_level_must_be_a_mapping():
    (violation,) = rejected("- just\n- a list\n")
    assert violation.line == 1 and "mapping" in violation.message


def test_unknown_task_type_named_with_line_and_suggestion():
    violations = rejected("""\
        name: p
        tasks:
          - type: card_prodution
            card_template: EmployeeCard
        """)
    violation = only(violations, "tasks[0].type")
    assert violation.line == 3
    assert "'card_prodution'" in violation.message and "did you mean 'card_production'" in violation.message


def test_unknown_key_named_with_suggestion():
    violations = rejected("""\
        name: p
        tasks:
          - type: card_production
            card_templat: EmployeeCard
        """)
    unknown = only(violations, "tasks[0].card_templat")
    assert unknown.line == 4 and "did you mean 'card_template'" in unknown.message
    missing = only(violations, "tasks[0].card_template")
    assert "missing required key" in missing.message


def test_unknown_top_level_key_named_with_suggestion():
    violation = only(rejected("name: p\ntask: []\n"), "task")
    assert "did you mean 'tasks'" in violation.message


def test_missing_name_and_tasks_both_reported():
    violations = rejected("inputs: [a]\n")
    assert {v.field_path for v in violations} == {"name", "tasks"}


def test_every_violation_listed_not_only_the_first():
    violations = rejected("""\
        name: p
        inputs: [person, pin, person]
        secret_inputs: [pim]
        tasks:
          - type: card_production
            card_template: EmployeCard
            reader: {sit: hq, kind: usb}
            subject: "CN=${persn}"
            fields: {USER_PIN: "${pin"}
          - type: change_state
            certificates: "${nowhere}"
            state: Revokd
        on_error:
          - type: handle_issued
            revoke_reason: cessation
        """)
    paths = {v.field_path: v.line for v in violations}
    assert paths == {
        "inputs[2]": 2,
        "secret_inputs[0]": 3,
        "tasks[0].card_template": 6,
        "tasks[0].reader.sit": 7,
        "tasks[0].reader.kind": 7,
        "tasks[0].subject": 8,
        "tasks[0].fields.USER_PIN": 9,
        "tasks[1].certificates": 11,
        "tasks[1].state": 12,
        "on_error[0].revoke_reason": 15,
    }
    assert [v.line for v in violations] == sorted(v.line for v in violations)
    messages = {v.field_path: v.message for v in violations}
    assert "did you mean 'pin'" in messages["secret_inputs[0]"]
    assert "did you mean 'EmployeeCard'" in messages["tasks[0].card_template"]
    assert "did you mean 'site'" in messages["tasks[0].reader.sit"]
    assert "did you mean 'person'" in messages["tasks[0].subject"]
    assert "did you mean 'Revoked'" in messages["tasks[1].state"]
    assert "did you mean 'cessationOfOperation'" in messages["on_error[0].revoke_reason"]


def test_error_text_lists_file_line_and_path():
    with pytest.raises(ProcessError) as info:
        load_process("name: p\ntasks:\n  - type: nope\n", "processes/p.yaml")
    assert "processes/p.yaml:3: tasks[0].type: unknown task type 'nope'" in str(info.value)


def test_wrong_types_are_rejected():
    violations = rejected("""\
        name: [p]
        inputs: person
        tasks:
          - type: card_production
            card_template: EmployeeCard
            fields: {USER_PIN: 1234}
            subject: {cn: x}
          - just text
        """)
    assert {v.field_path for v in violations} == {"name", "inputs", "tasks[0].fields.USER_PIN",
                                                  "tasks[0].subject", "tasks[1]"}
    assert "quote it" in only(violations, "tasks[0].fields.USER_PIN").message


def test_duplicate_keys_are_rejected():
    violation = only(rejected("name: p\nname: q\ntasks: [{type: handle_issued, target_state: Revoked}]\n"), "name")
    assert violation.line == 2 and "duplicate" in violation.message


def test_empty_task_list_is_rejected():
    assert "at least one task" in only(rejected("name: p\ntasks: []\n"), "tasks").message


def test_unknown_card_template_and_state_only_checked_when_known_names_given():
    text = """\
        name: p
        inputs: [c]
        tasks:
          - type: card_production
            card_template: Anything
          - type: change_state
            certificates: "${c}"
            state: Whatever
        """
    load(text, known_card_templates=None, known_states=None)
    assert {v.field_path for v in rejected(text)} == {"tasks[0].card_template", "tasks[1].state"}


def test_card_operation_needs_exactly_one_of_card_template_or_encoding():
    neither = rejected("name: p\ntasks:\n  - type: card_operation\n")
    both = rejected("name: p\ntasks:\n  - {type: card_operation, card_template: EmployeeCard, encoding: E}\n")
    assert "exactly one of 'card_template' or 'encoding'" in only(neither, "tasks[0]").message
    assert "not both" in only(both, "tasks[0]").message


def test_change_state_needs_exactly_one_of_certificates_or_card():
    violations = rejected("name: p\ninputs: [a]\ntasks:\n  - {type: change_state, state: Active}\n")
    assert "exactly one of 'certificates' or 'card'" in only(violations, "tasks[0]").message


def test_handle_issued_that_does_nothing_is_rejected():
    violations = rejected("name: p\ntasks:\n  - {type: handle_issued}\n")
    assert "does nothing" in only(violations, "tasks[0]").message


def test_removefromcrl_is_not_a_revocation_reason():
    violations = rejected("name: p\ntasks:\n  - {type: handle_issued, revoke_reason: removeFromCRL}\n")
    assert "unknown revocation reason" in only(violations, "tasks[0].revoke_reason").message


def test_names_are_literals_not_expressions():
    violations = rejected("name: p\ninputs: [s]\ntasks:\n  - {type: card_production, card_template: '${s}'}\n",
                          known_card_templates=None)
    assert "expressions are not allowed" in only(violations, "tasks[0].card_template").message


def test_certificates_and_card_must_be_a_single_variable():
    violations = rejected("""\
        name: p
        inputs: [a]
        tasks:
          - type: change_state_in_ca
            certificates: "cert-${a}"
            state: OnHold
        """)
    assert "exactly one variable" in only(violations, "tasks[0].certificates").message


# -- expressions and variables -----------------------------------------------------------------

@pytest.mark.parametrize("subject, problem", [
    ("CN=${person", "never closed"),
    ("CN=${}", "empty expression"),
    ("CN=${first name}", "not a variable name"),
    ("CN=${1st}", "not a variable name"),
    ("CN=${a${b}}", "no nesting"),
])
def test_malformed_expressions_are_rejected(subject, problem):
    violations = rejected(f"""\
        name: p
        inputs: [person]
        tasks:
          - type: card_production
            card_template: EmployeeCard
            subject: "{subject}"
        """)
    assert problem in only(violations, "tasks[0].subject").message


def test_variable_read_before_written_is_rejected():
    violations = rejected("""\
        name: p
        inputs: [person]
        tasks:
          - type: change_state
            certificates: "${cert}"
            state: OnHold
          - type: card_production
            card_template: EmployeeCard
            fields: {GeneratedCertApp_A: "${cert}"}
        """)
    violation = only(violations, "tasks[0].certificates")
    assert violation.line == 5 and "'cert'" in violation.message and "neither an input" in violation.message


def test_field_mapped_to_whole_variable_counts_as_written_for_later_tasks_and_error_path():
    definition = load("""\
        name: p
        tasks:
          - type: card_production
            card_template: EmployeeCard
            fields: {GeneratedCertApp_A: "${cert}"}
          - type: change_state
            certificates: "${cert}"
            state: OnHold
        on_error:
          - type: handle_issued
            certificates: "${cert}"
            revoke_reason: superseded
        """)
    assert definition.tasks[1].certificates == "cert"


def test_field_template_with_text_is_a_read_and_must_be_defined():
    violations = rejected("""\
        name: p
        tasks:
          - type: card_production
            card_template: EmployeeCard
            fields: {LABEL: "card of ${person}"}
        """)
    assert "'person'" in only(violations, "tasks[0].fields.LABEL").message


def test_error_path_sees_variables_written_by_any_task():
    definition = load("""\
        name: p
        inputs: [card]
        tasks:
          - {type: card_operation, card_template: EmployeeCard, card: "${card}", fields: {A: "${first}"}}
          - {type: card_operation, card_template: EmployeeCard, card: "${card}", fields: {B: "${second}"}}
        on_error:
          - {type: handle_issued, certificates: "${second}", target_state: Revoked}
        """)
    assert definition.on_error[0].certificates == "second"     # loaded: no "read before written" violation


def test_produced_card_variable_is_written_for_later_tasks():
    definition = load("""\
        name: p
        tasks:
          - {type: card_production, card_template: EmployeeCard, card: "${newCard}"}
          - {type: change_state, card: "${newCard}", state: Active}
        """)
    assert definition.tasks[0].card == "newCard"


def test_secret_input_only_allowed_in_fields():
    violations = rejected("""\
        name: p
        inputs: [pin, card]
        secret_inputs: [pin]
        tasks:
          - type: card_operation
            card_template: EmployeeCard
            card: "${card}"
            subject: "CN=${pin}"
            fields: {USER_PIN: "${pin}", LABEL: "pin ${pin}"}
          - {type: change_state, certificates: "${pin}", state: Active}
        """)
    assert {v.field_path for v in violations} == {"tasks[0].subject", "tasks[1].certificates"}
    assert all("secret input 'pin'" in v.message for v in violations)


def test_duplicate_inputs_and_unknown_secret_inputs_rejected():
    violations = rejected("name: p\ninputs: [a, b, a]\nsecret_inputs: [c]\n"
                          "tasks: [{type: handle_issued, target_state: Revoked}]\n")
    assert "duplicate input 'a'" in only(violations, "inputs[2]").message
    assert "not one of the inputs" in only(violations, "secret_inputs[0]").message


def test_variables_in_lists_names_in_order():
    assert variables_in("CN=${person},O=${org},OU=${person}") == ("person", "org", "person")
    assert variables_in("no expressions, $ and } are plain") == ()


def test_variable_of_only_accepts_a_whole_expression():
    assert variable_of("${cert}") == "cert"
    for not_whole in ("x${cert}", "${cert} ", "${a}${b}", "cert", "${1}", None, 3):
        assert variable_of(not_whole) is None


def test_render_substitutes_values():
    assert render("CN=${person},O=Example", {"person": "Alice"}) == "CN=Alice,O=Example"
    assert render("n=${n}", {"n": 7}) == "n=7"


def test_render_names_the_missing_variable():
    with pytest.raises(MissingVariable) as info:
        render("CN=${person}", {})
    assert info.value.name == "person" and "'person'" in str(info.value)


def test_render_does_not_rescan_substituted_values():
    assert render("${a}", {"a": "${b}"}) == "${b}"


def test_render_refuses_to_paste_a_descriptor_into_text():
    with pytest.raises(ExpressionError, match="Certificate descriptor"):
        render("id=${c}", {"c": CoreObjectDescriptor("Certificate", "T", "1")})


def test_render_takes_secrets_from_a_chain_without_storing_them():
    process_map = ProcessMap({"person": "Alice"}, secret_names={"pin"})
    assert render("${pin}", ChainMap({"pin": "123456"}, process_map)) == "123456"
    assert "pin" not in process_map


# -- process map ------------------------------------------------------------------------------

def test_secret_input_never_enters_process_map():
    process_map = ProcessMap(secret_names={"pin"})
    with pytest.raises(SecretInProcessMap, match="'pin'"):
        process_map["pin"] = "123456"
    with pytest.raises(SecretInProcessMap):
        ProcessMap({"pin": "123456"}, secret_names={"pin"})
    with pytest.raises(SecretInProcessMap):
        ProcessMap.from_dict({"pin": "123456"}, secret_names={"pin"})
    with pytest.raises(SecretInProcessMap):
        process_map.update(pin="123456")
    assert dict(process_map) == {}


def test_split_inputs_keeps_secrets_out_of_the_process_map():
    definition = load(VALID)
    process_map, secrets = definition.split_inputs({"person": "Alice", "pin": "123456"})
    assert dict(process_map) == {"person": "Alice"} and secrets == {"pin": "123456"}
    assert "123456" not in json.dumps(process_map.to_dict())
    with pytest.raises(SecretInProcessMap):
        process_map["pin"] = "123456"


def test_split_inputs_lists_missing_and_unknown_inputs():
    with pytest.raises(ValueError, match="missing inputs: pin; unknown inputs: persn"):
        load(VALID).split_inputs({"person": "A", "persn": "B"})


def test_core_object_descriptor_round_trips_through_process_map_json():
    cert = CoreObjectDescriptor("Certificate", "EmployeeAuthentication", "c-1")
    card = CoreObjectDescriptor("Card", "EmployeeCard", "k-9")
    process_map = ProcessMap({"cert": cert, "card": card, "person": "Alice", "n": 3, "ok": True,
                              "none": None, "all": [cert, card]})
    data = json.loads(json.dumps(process_map.to_dict()))
    assert data["cert"] == {"type": "Certificate", "template": "EmployeeAuthentication", "id": "c-1"}
    again = ProcessMap.from_dict(data)
    assert dict(again) == dict(process_map)
    assert again["all"] == [cert, card]


def test_core_object_descriptor_from_dict_rejects_malformed():
    for bad in ({"type": "Certificate", "id": "1"}, {"type": "C", "template": "T", "id": 1},
                {"type": "C", "template": "T", "id": "1", "extra": "x"}):
        with pytest.raises(ValueError):
            CoreObjectDescriptor.from_dict(bad)


def test_process_map_refuses_values_that_are_not_json_like():
    process_map = ProcessMap()
    with pytest.raises(TypeError):
        process_map["x"] = {"plain": "dict"}   # would be mistaken for a descriptor when read back
    with pytest.raises(TypeError):
        process_map["x"] = b"bytes"
    with pytest.raises(KeyError):
        process_map["not a name"] = "x"
