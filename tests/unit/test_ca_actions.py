"""C17: the strict table from a target state to a CA action (orchestrator/domain/ca_actions.py)."""
from __future__ import annotations

import pathlib

import pytest

from orchestrator.domain.ca_actions import LiftHold, Revoke, ca_action_for, is_hold_state, mapped_states
from orchestrator.domain.state_graphs import RFC5280_REASONS, State, StateGraph, load_state_graph, load_state_graphs
from shared.errors import InvalidArgument, UnmappedCaAction

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "state-graphs"

# A graph whose states rely on their NAMES (no ca_action declared), plus one unmapped state.
BY_NAME = """
name: ByName
kind: certificate
start: Valid
states:
  Issued: {}
  Valid: {}
  keyCompromise: {final: true}
  Superseded: {final: true}
  Suspended: {}
  on_hold: {}
  removeFromCRL: {}
  Lost: {}
  Declared: {ca_action: privilegeWithdrawn, final: true}
  suspended_but_declared: {ca_action: affiliationChanged, final: true}
transitions:
  - {from: Issued, to: Valid}
  - {from: Valid, to: keyCompromise, reasons: [stolen]}
  - {from: [Valid, Suspended], to: Superseded}
  - {from: Valid, to: Suspended}
  - {from: Valid, to: on_hold}
  - {from: Suspended, to: Valid}
  - {from: on_hold, to: removeFromCRL}
  - {from: removeFromCRL, to: Valid}
  - {from: [Valid, Suspended], to: Lost}
  - {from: Valid, to: Declared}
  - {from: Valid, to: suspended_but_declared}
"""


@pytest.fixture(scope="module")
def example():
    return load_state_graphs(EXAMPLES)["EmployeeCertificate"]


@pytest.fixture(scope="module")
def by_name():
    return load_state_graph(BY_NAME, "by-name.yaml")


def test_c17_declared_ca_action_wins(example, by_name):
    assert ca_action_for(example, "Active", "Revoked") == Revoke("keyCompromise")
    assert ca_action_for(example, "Active", "Retired") == Revoke("cessationOfOperation")
    assert ca_action_for(example, "Active", "Replaced") == Revoke("superseded")
    assert ca_action_for(example, "Active", "OnHold") == Revoke("certificateHold")
    assert ca_action_for(example, "OnHold", "Active") == LiftHold()       # declared removeFromCRL
    assert ca_action_for(by_name, "Valid", "Declared") == Revoke("privilegeWithdrawn")
    # A declared action beats a hold-like name.
    assert ca_action_for(by_name, "Valid", "suspended_but_declared") == Revoke("affiliationChanged")


def test_c17_reason_name_state_passes_through(by_name):
    assert ca_action_for(by_name, "Valid", "keyCompromise") == Revoke("keyCompromise")
    assert ca_action_for(by_name, "Valid", "Superseded") == Revoke("superseded")   # letter case only
    assert ca_action_for(by_name, "on_hold", "removeFromCRL") == LiftHold()


@pytest.mark.parametrize("name", ["hold", "Hold", "OnHold", "on_hold", "On Hold", "on-hold", "Suspended",
                                  "SUSPENDED", "certificateHold", "CertificateHold"])
def test_c17_hold_state_maps_to_certificate_hold(name):
    graph = StateGraph("G", "certificate", "A", {"A": State("A"), name: State(name)}, ())
    assert ca_action_for(graph, "A", name) == Revoke("certificateHold")
    assert is_hold_state(graph, name)


def test_c17_reactivation_lifts_hold(by_name):
    assert ca_action_for(by_name, "Suspended", "Valid") == LiftHold()    # hold-like name -> no-action state
    # From a hold state to a revoking state is a revocation, not a re-activation.
    assert ca_action_for(by_name, "Suspended", "Superseded") == Revoke("superseded")


def test_c17_unmapped_state_is_error(by_name, example):
    with pytest.raises(UnmappedCaAction) as err:
        ca_action_for(by_name, "Valid", "Lost")
    message = str(err.value)
    assert "'Lost' maps to no CA action" in message and "Nothing was sent to the CA" in message
    for mapped in ("keyCompromise (keyCompromise)", "Suspended (certificateHold)", "Declared (privilegeWithdrawn)"):
        assert mapped in message
    assert err.value.metadata["to_state"] == "Lost"
    # The same target from a hold state is a re-activation (rule d): Lost implies no revocation.
    assert ca_action_for(by_name, "Suspended", "Lost") == LiftHold()
    # The internal issued state and plain states map to nothing.
    with pytest.raises(UnmappedCaAction):
        ca_action_for(by_name, "Issued", "Valid")
    # A typo is never close enough: it is an unknown state, with a suggestion.
    with pytest.raises(UnmappedCaAction, match=r"unknown state 'Revokd' \(did you mean 'Revoked'\?\)"):
        ca_action_for(example, "Active", "Revokd")
    for typo in ("keyCompromize", "key_compromise", "Suspend", "holding"):
        graph = StateGraph("G", "certificate", "A", {"A": State("A"), typo: State(typo)}, ())
        with pytest.raises(UnmappedCaAction):
            ca_action_for(graph, "A", typo)


def test_c17_every_rfc5280_reason_name_passes_through():
    for reason in RFC5280_REASONS:
        graph = StateGraph("G", "certificate", "A", {"A": State("A"), reason: State(reason)}, ())
        expected = LiftHold() if reason == "removeFromCRL" else Revoke(reason)
        assert ca_action_for(graph, "A", reason) == expected


def test_c17_declared_action_that_is_no_reason_is_refused():
    # The loader refuses this; a graph built in code must not slip through either.
    graph = StateGraph("G", "certificate", "A", {"A": State("A"), "B": State("B", ca_action="revoke")}, ())
    with pytest.raises(UnmappedCaAction, match="not an RFC 5280 reason name"):
        ca_action_for(graph, "A", "B")


def test_revoke_accepts_only_revocation_reasons():
    with pytest.raises(InvalidArgument):
        Revoke("keycompromise")
    with pytest.raises(InvalidArgument, match="LiftHold"):
        Revoke("removeFromCRL")
    assert Revoke("certificateHold").to_dict() == {"ca_action": "revoke", "ca_reason": "certificateHold"}
    assert LiftHold().to_dict() == {"ca_action": "lift_hold", "ca_reason": "removeFromCRL"}


def test_mapped_states_of_the_example(example):
    assert mapped_states(example) == {"Active": "removeFromCRL", "OnHold": "certificateHold",
                                      "Revoked": "keyCompromise", "Retired": "cessationOfOperation",
                                      "Replaced": "superseded"}


def test_c17_an_rfc5280_transition_reason_refines_a_revocation_only():
    example = load_state_graphs(EXAMPLES)["EmployeeCertificate"]
    assert ca_action_for(example, "Active", "Revoked", "cessationOfOperation") == Revoke("cessationOfOperation")
    assert ca_action_for(example, "Active", "Revoked", "cardLost") == Revoke("keyCompromise")
    assert ca_action_for(example, "Active", "Revoked", None) == Revoke("keyCompromise")
    assert ca_action_for(example, "Active", "OnHold", "keyCompromise") == Revoke("certificateHold")
    assert ca_action_for(example, "OnHold", "Active", "keyCompromise") == LiftHold()
    assert ca_action_for(example, "Active", "Retired", "certificateHold") == Revoke("cessationOfOperation")
