"""C14/C15: the internal issued state is checked before start-up, every violation listed."""
import pytest

from orchestrator.domain.issued_state import (
    DEFAULT_INTERNAL_ISSUED_STATE,
    INTERNAL_ISSUED_STATE_KEY,
    TemplateRef,
    check_internal_issued_state,
    require_internal_issued_state,
)
from orchestrator.domain.state_graphs import StateGraphError, load_state_graph

CERT = """\
name: {name}
kind: certificate
start: Active
states:
  {issued}: {{}}
  Active:  {{ca_action: removeFromCRL}}
  OnHold:  {{ca_action: certificateHold}}
  Revoked: {{ca_action: keyCompromise, final: true}}
transitions:
  - {{from: {issued}, to: Active}}
  - {{from: Active, to: OnHold, reasons: [suspended]}}
  - {{from: OnHold, to: Active}}
  - {{from: [Active, OnHold], to: Revoked}}
"""

CARD = """\
name: EmployeeCard
kind: card
start: InProduction
states: {InProduction: {}, Active: {}}
transitions: [{from: InProduction, to: Active}]
"""


def graph(text: str, source: str, issued: str = "Issued"):
    return load_state_graph(text, source, internal_issued_state=issued)


def cert(name="EmployeeCertificate", issued="Issued", source=None):
    return graph(CERT.format(name=name, issued=issued), source or f"{name}.yaml", issued)


def graphs_of(*gs):
    return {g.name: g for g in gs}


def template(name="EmployeeAuthentication", state_graph="EmployeeCertificate", issued="Issued", line=1):
    return TemplateRef(name, "templates.yaml", line, state_graph, issued)


def test_config_key_and_default_name():
    assert INTERNAL_ISSUED_STATE_KEY == "stateGraphDefinitionManager.certificateInternalIssuedState"
    assert DEFAULT_INTERNAL_ISSUED_STATE == "Issued"


def test_c14_consistent_configuration_has_no_violation():
    gs = graphs_of(cert(), graph(CARD, "card.yaml"))
    assert check_internal_issued_state("Issued", gs, [template()]) == []
    custom = graphs_of(cert(issued="MyCustomState"))
    assert check_internal_issued_state("MyCustomState", custom, [template(issued="MyCustomState")]) == []
    require_internal_issued_state("MyCustomState", custom, [template(issued="MyCustomState")])


def test_c14_custom_issued_state_missing_from_a_graph_is_listed():
    gs = graphs_of(cert("Good", issued="MyCustomState"), cert("Old", issued="Issued"))
    [v] = check_internal_issued_state("MyCustomState", gs, [])
    assert (v.source, v.line, v.field_path) == ("Old.yaml", 1, "states")
    assert "'Old'" in v.message and "lacks the internal issued state 'MyCustomState'" in v.message
    assert INTERNAL_ISSUED_STATE_KEY in v.message


def test_c14_every_violation_listed_not_only_the_first():
    gs = graphs_of(cert("A", issued="Issued"), cert("B", issued="Issued"), cert("C", issued="MyCustomState"))
    templates = [template("T1", "A", "Issued", line=3), template("T2", "C", None, line=9),
                 template("T3", "Nope", "MyCustomState", line=15)]
    found = check_internal_issued_state("MyCustomState", gs, templates)
    where = [(v.source, v.line, v.field_path) for v in found]
    assert where == [
        ("A.yaml", 1, "states"),
        ("B.yaml", 1, "states"),
        ("templates.yaml", 3, "internal_issued_state"),
        ("templates.yaml", 9, "internal_issued_state"),
        ("templates.yaml", 15, "state_graph"),
    ]
    with pytest.raises(StateGraphError) as err:
        require_internal_issued_state("MyCustomState", gs, templates)
    assert len(err.value.violations) == 5 and "5 problems" in str(err.value)


def test_c14_issued_state_reachable_from_other_state_rejected():
    text = CERT.format(name="G", issued="Issued") + "  - {from: OnHold, to: Issued}\n"
    [v] = check_internal_issued_state("Issued", graphs_of(graph(text, "g.yaml")), [])
    assert (v.line, v.field_path) == (14, "transitions[4].to")
    assert "must not be reachable from another state (transition OnHold → Issued)" in v.message


def test_c14_issued_state_leading_elsewhere_than_start_rejected():
    text = CERT.format(name="G", issued="Issued") + "  - {from: Issued, to: Revoked}\n"
    [v] = check_internal_issued_state("Issued", graphs_of(graph(text, "g.yaml")), [])
    assert v.line == 14 and "may only lead to the start state 'Active'" in v.message


def test_c14_issued_state_as_start_state_rejected():
    text = "name: G\nkind: certificate\nstart: Issued\nstates: {Issued: {}, Active: {}}\n" \
           "transitions: [{from: Issued, to: Active}]\n"
    found = check_internal_issued_state("Issued", graphs_of(graph(text, "g.yaml")), [])
    messages = " / ".join(v.message for v in found)
    assert "must not be the start state" in messages
    assert "may only lead to the start state 'Issued'" in messages  # Issued → Active is then a second use


def test_c14_issued_state_implying_a_ca_action_rejected():
    text = CERT.format(name="G", issued="Issued").replace("  Issued: {}", "  Issued: {ca_action: certificateHold}")
    [v] = check_internal_issued_state("Issued", graphs_of(graph(text, "g.yaml")), [])
    assert v.field_path == "states.Issued.ca_action"


def test_c14_template_not_configuring_issued_state_rejected():
    [v] = check_internal_issued_state("Issued", graphs_of(cert()), [template("T", issued=None, line=7)])
    assert (v.source, v.line, v.field_path) == ("templates.yaml", 7, "internal_issued_state")
    assert "'T': does not configure the internal issued state; it must be 'Issued'" in v.message


def test_c14_template_configuring_another_issued_state_rejected():
    [v] = check_internal_issued_state("Issued", graphs_of(cert()), [template(issued="Pending")])
    assert "configures the internal issued state 'Pending'" in v.message and "is 'Issued'" in v.message


def test_c14_template_naming_missing_or_card_graph_rejected():
    gs = graphs_of(cert(), graph(CARD, "card.yaml"))
    missing, card = check_internal_issued_state(
        "Issued", gs, [template("T1", "EmployeeCertficate"), template("T2", "EmployeeCard")])
    assert "does not exist" in missing.message and missing.suggestion == "EmployeeCertificate"
    assert "is a card state graph" in card.message


def test_c14_card_graphs_are_not_subject():
    assert check_internal_issued_state("MyCustomState", graphs_of(graph(CARD, "card.yaml")), []) == []


def test_c14_empty_configured_name_rejected():
    [v] = check_internal_issued_state("  ", graphs_of(cert()), [])
    assert v.field_path == INTERNAL_ISSUED_STATE_KEY


def test_c15_transition_issued_to_start_required_with_default_name():
    text = CERT.format(name="G", issued="Issued").replace("  - {from: Issued, to: Active}\n", "")
    g = graph(text, "g.yaml")  # loads: Issued is exempt from reachability, but C15 catches it
    [v] = check_internal_issued_state(DEFAULT_INTERNAL_ISSUED_STATE, graphs_of(g), [])
    assert (v.source, v.line, v.field_path) == ("g.yaml", 5, "states.Issued")
    assert "needs a transition from the internal issued state 'Issued' to the start state 'Active'" in v.message


def test_c15_transition_issued_to_start_must_not_require_a_reason():
    text = CERT.format(name="G", issued="Issued").replace("{from: Issued, to: Active}",
                                                          "{from: Issued, to: Active, reasons: [done]}")
    [v] = check_internal_issued_state("Issued", graphs_of(graph(text, "g.yaml")), [])
    assert v.field_path == "transitions[0].reasons"
