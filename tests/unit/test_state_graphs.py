"""State graphs as data: loading, every located violation at once, and moves."""
import textwrap
from pathlib import Path

import pytest

from orchestrator.domain.state_graphs import (
    IllegalMove,
    StateGraphError,
    load_state_graph,
    load_state_graphs,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "state-graphs"

GOOD = """\
name: EmployeeCertificate
kind: certificate
start: Active
states:
  Issued: {}
  Active:  {ca_action: removeFromCRL}
  OnHold:  {ca_action: certificateHold}
  Revoked: {ca_action: keyCompromise, final: true}
transitions:
  - {from: Issued, to: Active}
  - {from: Active, to: OnHold, reasons: [suspended]}
  - {from: OnHold, to: Active}
  - {from: [Active, OnHold], to: Revoked, reasons: [keyCompromise, cessationOfOperation]}
"""


def violations_of(text: str, source: str = "g.yaml"):
    with pytest.raises(StateGraphError) as err:
        load_state_graph(textwrap.dedent(text), source)
    return err.value.violations


def test_good_graph_loads_into_values():
    g = load_state_graph(GOOD, "g.yaml")
    assert (g.name, g.kind, g.start) == ("EmployeeCertificate", "certificate", "Active")
    assert list(g.states) == ["Issued", "Active", "OnHold", "Revoked"]
    assert g.states["OnHold"].ca_action == "certificateHold"
    assert g.states["Revoked"].final and not g.states["Active"].final
    assert g.states["Issued"].ca_action is None
    # `from: [Active, OnHold]` is one transition per source state
    revoking = [t for t in g.transitions if t.target == "Revoked"]
    assert [(t.source, t.reasons) for t in revoking] == [
        ("Active", ("keyCompromise", "cessationOfOperation")),
        ("OnHold", ("keyCompromise", "cessationOfOperation")),
    ]
    assert g.source == "g.yaml" and g.line == 1


def test_examples_load_cleanly():
    graphs = load_state_graphs(EXAMPLES)
    assert graphs["EmployeeCertificate"].kind == "certificate"
    card = graphs["EmployeeCard"]
    assert card.kind == "card" and card.start == "InProduction"
    assert card.can_move("InProduction", "Active") and card.can_move("InProduction", "ProductionFailed")


def test_moves_follow_transitions_and_reasons():
    g = load_state_graph(GOOD, "g.yaml")
    assert g.can_move("Issued", "Active")
    assert g.can_move("Active", "OnHold", "suspended")
    assert not g.can_move("Active", "OnHold")  # the transition needs a reason
    assert not g.can_move("Active", "OnHold", "holiday")  # not one of its reasons
    assert not g.can_move("OnHold", "Active", "suspended")  # takes no reason
    assert not g.can_move("Revoked", "Active")
    assert not g.can_move("Nowhere", "Active")
    assert g.require_move("OnHold", "Revoked", "keyCompromise").target == "Revoked"


def test_require_move_says_why_not():
    g = load_state_graph(GOOD, "g.yaml")
    with pytest.raises(IllegalMove, match=r"no transition Active → Issued \(from Active: OnHold, Revoked\)"):
        g.require_move("Active", "Issued")
    with pytest.raises(IllegalMove, match=r"unknown state 'Actve' \(did you mean 'Active'\?\)"):
        g.require_move("Actve", "OnHold", "suspended")
    with pytest.raises(IllegalMove, match=r"needs one of the reasons suspended; got no reason"):
        g.require_move("Active", "OnHold")
    with pytest.raises(IllegalMove, match=r"got reason 'suspend' \(did you mean 'suspended'\?\)"):
        g.require_move("Active", "OnHold", "suspend")
    with pytest.raises(IllegalMove, match=r"takes no reason"):
        g.require_move("OnHold", "Active", "suspended")
    with pytest.raises(IllegalMove, match=r"none, it is final"):
        g.require_move("Revoked", "Active")


def test_reachable_from_includes_the_state_itself():
    g = load_state_graph(GOOD, "g.yaml")
    assert g.reachable_from("Active") == {"Active", "OnHold", "Revoked"}
    assert g.reachable_from("Revoked") == {"Revoked"}
    assert g.reachable_from("Issued") == {"Issued", "Active", "OnHold", "Revoked"}


def test_unknown_state_in_transition_names_file_line_and_suggestion():
    text = GOOD.replace("{from: OnHold, to: Active}", "{from: OnHold, to: Actve}")
    [v] = violations_of(text, "graphs/cert.yaml")
    assert (v.source, v.line, v.field_path, v.suggestion) == ("graphs/cert.yaml", 12, "transitions[2].to", "Active")
    assert "'Actve' is not declared" in v.message
    assert str(v) == ("graphs/cert.yaml:12: transitions[2].to: state 'Actve' is not declared in states "
                      "(did you mean 'Active'?)")


def test_every_violation_listed_not_only_the_first():
    found = violations_of("""\
        name: X
        kind: certficate
        start: Actve
        states:
          Active: {ca_action: keycompromise, fnal: true}
          Active: {}
          Gone: {final: 3}
        transitions:
          - {from: Active, to: Gone}
          - {form: Active, to: Gone}
        colour: blue
        """)
    by_line = {(v.line, v.field_path): v for v in found}
    assert by_line[(2, "kind")].suggestion == "certificate"
    assert by_line[(3, "start")].suggestion == "Active"
    assert by_line[(5, "states.Active.ca_action")].suggestion == "keyCompromise"
    assert by_line[(5, "states.Active.fnal")].suggestion == "final"
    assert "appears twice (first at line 5)" in by_line[(6, "states.Active")].message
    assert "expected true or false" in by_line[(7, "states.Gone.final")].message
    assert by_line[(10, "transitions[1].form")].suggestion == "from"
    assert "missing required key 'from'" in by_line[(10, "transitions[1]")].message
    assert "unknown key 'colour'" in by_line[(11, "colour")].message
    assert len(found) == 9


def test_yaml_syntax_error_is_located():
    [v] = violations_of("name: X\nkind: card\nstates: [\n")
    assert v.line == 4 and v.message.startswith("YAML syntax error")


def test_wrong_types_rejected():
    found = violations_of("""\
        name: [a, b]
        kind: card
        start: A
        states: [A, B]
        transitions: {from: A, to: B}
        """)
    paths = {v.field_path: v.message for v in found}
    assert paths["name"] == "expected a name, found a list"
    assert paths["states"] == "expected a mapping, found a list"
    assert paths["transitions"] == "expected a list of transitions, found a mapping"


def test_empty_and_non_mapping_files_rejected():
    assert "empty file" in violations_of("")[0].message
    assert "expected a mapping" in violations_of("- a\n- b\n")[0].message


def test_missing_start_state_rejected():
    found = violations_of("name: X\nkind: card\nstates: {A: {}}\n")
    assert [(v.line, v.message) for v in found] == [(1, "missing required key 'start'")]


def test_start_state_not_declared_rejected():
    [v] = violations_of("name: X\nkind: card\nstart: Begin\nstates: {Begun: {}}\n")
    assert (v.line, v.field_path, v.suggestion) == (3, "start", "Begun")


def test_unreachable_state_rejected_but_internal_issued_state_exempt():
    [v] = violations_of(GOOD.replace("  Revoked:", "  Lost: {}\n  Revoked:"))
    assert (v.line, v.field_path) == (8, "states.Lost")
    assert "'Lost' is unreachable from the start state 'Active'" in v.message


def test_custom_internal_issued_state_exempt_from_reachability():
    text = GOOD.replace("Issued", "MyCustomState")
    assert "MyCustomState" in load_state_graph(text, "g.yaml", internal_issued_state="MyCustomState").states
    [v] = violations_of(text)  # with the default name, MyCustomState is just unreachable
    assert v.field_path == "states.MyCustomState"


def test_card_graph_has_no_exempt_issued_state():
    [v] = violations_of("name: C\nkind: card\nstart: A\nstates: {A: {}, Issued: {}}\ntransitions:\n"
                        "  - {from: Issued, to: A}\n")
    assert v.field_path == "states.Issued" and "unreachable" in v.message


def test_unknown_ca_action_rejected():
    [v] = violations_of(GOOD.replace("certificateHold", "hold"))
    assert (v.line, v.field_path) == (7, "states.OnHold.ca_action")
    assert "RFC 5280" in v.message


def test_final_state_with_outgoing_transition_rejected():
    [v] = violations_of(GOOD + "  - {from: Revoked, to: Active}\n")
    assert (v.line, v.field_path) == (14, "transitions[4].from")
    assert "'Revoked' is final" in v.message


def test_duplicate_transition_rejected():
    [v] = violations_of(GOOD + "  - {from: OnHold, to: Active}\n")
    assert v.line == 14 and "duplicate transition OnHold → Active (first at line 12)" in v.message


def test_state_names_are_literal_not_yaml_booleans():
    g = load_state_graph("name: X\nkind: card\nstart: On\nstates: {On: {}, Off: {}}\n"
                         "transitions: [{from: On, to: Off}, {from: Off, to: On}]\n", "g.yaml")
    assert g.can_move("On", "Off")


def test_directory_reports_violations_of_every_file_and_duplicate_names(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)  # same name again
    (tmp_path / "c.yml").write_text("name: C\nkind: card\nstart: A\nstates: {A: {}, B: {}}\n")
    (tmp_path / "d.yaml").write_bytes(b"name: \xff\n")
    (tmp_path / "notes.txt").write_text("not a graph")
    with pytest.raises(StateGraphError) as err:
        load_state_graphs(tmp_path)
    found = {(Path(v.source).name, v.line, v.field_path) for v in err.value.violations}
    assert found == {("b.yaml", 1, "name"), ("c.yml", 4, "states.B"), ("d.yaml", 1, "")}
    text = str(err.value)
    assert "3 problems" in text and "already defined in" in text and "not UTF-8" in text


def test_missing_directory_reported():
    with pytest.raises(StateGraphError, match="does not exist"):
        load_state_graphs("/nonexistent/state-graphs")


# -- certificates follow their card (docs/state-graphs.md "Certificates follow their card") --

CERT_GRAPH = """\
name: Cert
kind: certificate
start: Active
states:
  Issued: {}
  Active: {ca_action: removeFromCRL}
  OnHold: {ca_action: certificateHold}
  Revoked: {ca_action: keyCompromise, final: true}
  Parked: {}
transitions:
  - {from: Issued, to: Active}
  - {from: Active, to: OnHold, reasons: [suspended]}
  - {from: OnHold, to: Active}
  - {from: [Active, OnHold], to: Revoked, reasons: [keyCompromise, cardLost]}
  - {from: Active, to: Parked}
"""


def _card_graph(moves: str, certificate_graph: str = "Cert") -> str:
    return (f"name: Card\nkind: card\nstart: Active\ncertificate_graph: {certificate_graph}\n"
            "states:\n  Active: {}\n  Locked: {}\n  Lost: {final: true}\n"
            f"transitions:\n{moves}")


def _load_pair(tmp_path, card_text: str):
    (tmp_path / "cert.yaml").write_text(CERT_GRAPH)
    (tmp_path / "card.yaml").write_text(card_text)
    return load_state_graphs(tmp_path)


def test_card_transitions_name_what_happens_to_the_cards_certificates():
    graphs = load_state_graphs(EXAMPLES)
    card = graphs["EmployeeCard"]
    assert card.certificate_graph == "EmployeeCertificate"
    moves = {(t.source, t.target): (t.certificates.state, t.certificates.reason)
             for t in card.transitions if t.certificates}
    assert moves == {("Active", "Locked"): ("OnHold", "suspended"), ("Locked", "Active"): ("Active", None),
                     ("Active", "Lost"): ("Revoked", "keyCompromise"), ("Locked", "Lost"): ("Revoked", "keyCompromise"),
                     ("Active", "Retired"): ("Retired", "cessationOfOperation"),
                     ("Locked", "Retired"): ("Retired", "cessationOfOperation")}
    assert card.final_states == {"ProductionFailed", "Lost", "Retired"}


def test_certificate_moves_of_card_graphs_are_checked_at_load_with_their_lines(tmp_path):
    text = _card_graph(
        "  - {from: Active, to: Locked, certificates: {state: OnHlod, reason: suspended}}\n"      # line 10
        "  - {from: Locked, to: Active, certificates: {state: Active, reason: unlocked}}\n"       # line 11
        "  - {from: Active, to: Lost, certificates: {state: Revoked, reason: keyCompromize}}\n"   # line 12
        "  - {from: Locked, to: Lost, certificates: {state: Parked}}\n")                          # line 13
    with pytest.raises(StateGraphError) as err:
        _load_pair(tmp_path, text)
    found = {(v.line, v.field_path, v.message, v.suggestion) for v in err.value.violations}
    card = str(tmp_path / "card.yaml")
    assert all(v.source == card for v in err.value.violations)
    assert (10, "transitions[0].certificates.state", "state 'OnHlod' is not declared in the certificate graph "
            "'Cert'", "OnHold") in found
    assert any(line == 11 and path == "transitions[1].certificates.reason" and "takes reason 'unlocked'" in msg
               for line, path, msg, _ in found)
    assert any(line == 12 and "takes reason 'keyCompromize'" in msg and "(did you mean 'keyCompromise'?)" in msg
               for line, _, msg, _ in found)
    assert any(line == 13 and "Active → Parked maps to no CA action (C17)" in msg for line, _, msg, _ in found)
    assert len(found) == 4


def test_certificate_moves_need_an_existing_certificate_graph_and_a_card_graph(tmp_path):
    with pytest.raises(StateGraphError) as err:
        _load_pair(tmp_path, _card_graph("  - {from: Active, to: Locked, certificates: {state: OnHold, "
                                         "reason: suspended}}\n  - {from: Locked, to: Lost}\n",
                                         certificate_graph="Crt"))
    assert [(v.field_path, v.suggestion) for v in err.value.violations] == [("certificate_graph", "Cert")]
    no_graph = _card_graph("  - {from: Active, to: Locked, certificates: {state: OnHold}}\n"
                           "  - {from: Locked, to: Lost}\n").replace(
        "certificate_graph: Cert\n", "")
    with pytest.raises(StateGraphError, match=r"transitions\[0\].certificates: the card's certificates are moved, "
                                              "but the graph names no `certificate_graph`"):
        load_state_graph(no_graph, "card.yaml")
    on_cert = CERT_GRAPH.replace("  - {from: Active, to: Parked}", "  - {from: Active, to: Parked, "
                                 "certificates: {state: Active}}")
    with pytest.raises(StateGraphError, match="only the transitions of a card graph move certificates"):
        load_state_graph(on_cert, "cert.yaml")
