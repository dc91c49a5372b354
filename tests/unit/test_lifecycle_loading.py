"""Loading what the lifecycle processes need (docs/lifecycle.md, docs/processes.md): the
`load_certificates` task, the `holder` of a card production, the `NewPIN` keyword, and the
page tokens of the new List RPCs."""
from __future__ import annotations

import textwrap

import pytest

from orchestrator.domain.encoding import EncodingError, parse_encoding
from orchestrator.domain.processes import LoadCertificatesTask, ProcessError, load_process


def load(text: str, **kw):
    return load_process(textwrap.dedent(text), "p.yaml", **kw)


def test_load_certificates_loads_typed_with_a_literal_or_a_variable_number_of_days():
    definition = load("""\
        name: renew
        inputs: [card, days]
        tasks:
          - {type: load_certificates, card: "${card}", into: "${soon}", state: Active, expiring_within_days: 30}
          - {type: load_certificates, card: "${card}", into: "${later}", expiring_within_days: "${days}",
             template: EmployeeAuthentication, at_least_one: true}
          - {type: change_state_in_ca, certificates: "${soon}", state: Replaced}
        """, known_states={"Active", "Replaced"})
    first, second = definition.tasks[:2]
    assert first == LoadCertificatesTask(line=4, card="card", into="soon", state="Active", expiring_within_days="30")
    assert (second.expiring_within_days, second.template, second.at_least_one) == ("${days}", "EmployeeAuthentication",
                                                                                   True)


def test_load_certificates_violations_are_located_and_all_reported():
    with pytest.raises(ProcessError) as caught:
        load("""\
            name: broken
            inputs: [card, pin]
            secret_inputs: [pin]
            tasks:
              - type: load_certificates
                card: "${crad}"
                into: "${pin}"
                state: Activ
                expiring_within_days: soon
                at_least_one: 3
              - type: load_certificates
                card: "${card}"
            """, known_states={"Active"})
    text = str(caught.value)
    assert "p.yaml:6: tasks[0].card: variable 'crad' is read here" in text and "did you mean 'card'" in text
    assert "p.yaml:7: tasks[0].into: 'pin' is a secret input" in text
    assert "p.yaml:8: tasks[0].state: unknown state 'Activ'" in text
    assert "p.yaml:9: tasks[0].expiring_within_days: must be a number of days" in text
    assert "p.yaml:10: tasks[0].at_least_one: must be true or false" in text
    assert "tasks[1].into: missing required key 'into'" in text


def test_load_certificates_writes_its_variable_for_later_tasks_and_the_error_path():
    definition = load("""\
        name: ok
        inputs: [card]
        tasks:
          - {type: load_certificates, card: "${card}", into: "${found}"}
          - {type: change_state, certificates: "${found}", state: OnHold}
        on_error:
          - {type: handle_issued, certificates: "${found}", target_state: Revoked}
        """)
    assert len(definition.tasks) == 2


def test_card_production_holder_is_a_template_whose_variables_must_be_defined():
    definition = load("""\
        name: produce
        inputs: [person]
        tasks:
          - {type: card_production, card_template: EmployeeCard, holder: "${person} (HR)"}
        """)
    assert definition.tasks[0].holder == "${person} (HR)"
    with pytest.raises(ProcessError, match=r"tasks\[0\]\.holder: variable 'persn' is read here"):
        load("""\
            name: produce
            inputs: [person]
            tasks:
              - {type: card_production, card_template: EmployeeCard, holder: "${persn}"}
            """)


PIN_CHANGE = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=
NEW_USER_PIN=
PUK=

[Description]
SetPIN={set_pin}
PIN=USER_PIN
NewPIN=NEW_USER_PIN
{extra}
"""


def test_new_pin_makes_set_pin_a_change_by_the_holder_with_both_pins_as_input_fields():
    encoding = parse_encoding(PIN_CHANGE.format(set_pin="true", extra=""), "change-pin.ini")
    assert encoding.description.new_pin_field == "NEW_USER_PIN"
    assert encoding.input_fields() == ("USER_PIN", "NEW_USER_PIN")


@pytest.mark.parametrize(("set_pin", "extra", "message"), [
    ("false", "", "NewPIN needs SetPIN=true"),
    ("true", "InitialPUK=PUK", "cannot be combined with InitialPUK"),
])
def test_new_pin_refused_without_set_pin_or_with_initial_puk(set_pin, extra, message):
    with pytest.raises(EncodingError, match=message):
        parse_encoding(PIN_CHANGE.format(set_pin=set_pin, extra=extra), "change-pin.ini")

