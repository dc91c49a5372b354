"""Property: whatever the process loader is given, it loads or raises ProcessError whose every
violation is located (a source and a line ≥ 1). Nothing else may escape."""
from __future__ import annotations

import pathlib

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.domain.processes import TASK_TYPES, ProcessDefinition, ProcessError, load_process

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "processes"
EXAMPLE_TEXTS = [p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))]

# Words the loader knows, so that generated structures get past the first check often.
KEYS = ["name", "description", "inputs", "secret_inputs", "tasks", "on_error", "type", "card_template",
        "encoding", "reader", "subject", "fields", "card", "certificates", "state", "reason",
        "revoke_reason", "target_state", "gateway", "site", "labels", "kind", "USER_PIN"]
WORDS = [*TASK_TYPES, "EmployeeCard", "Revoked", "cessationOfOperation", "pkcs11", "pcsc",
         "${person}", "${pin}", "${x", "${}", "${a b}", "CN=${person}", "person", "pin"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.sampled_from(WORDS), st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)


def check(text: str) -> None:
    try:
        definition = load_process(text, "fuzz.yaml", known_card_templates={"EmployeeCard"},
                                  known_states={"Active", "Revoked"})
    except ProcessError as e:
        assert e.violations
        for violation in e.violations:
            assert violation.source == "fuzz.yaml"
            assert isinstance(violation.line, int) and violation.line >= 1
            assert violation.message
    else:
        assert isinstance(definition, ProcessDefinition)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_never_crashes_the_loader(text):
    check(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, structures, max_size=7))
def test_generated_yaml_structures_never_crash_the_loader(document):
    check(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"name": st.sampled_from(["p", "${p}", ""])},
                             optional={"inputs": st.lists(st.sampled_from(WORDS + KEYS), max_size=4),
                                       "secret_inputs": st.lists(st.sampled_from(WORDS), max_size=2),
                                       "tasks": st.lists(st.dictionaries(keys, structures, max_size=6)
                                                         .map(lambda d: d | {"type": d.get("type", "x")}),
                                                         max_size=3),
                                       "on_error": st.lists(st.dictionaries(keys, structures, max_size=4),
                                                            max_size=2)}))
def test_generated_process_shapes_never_crash_the_loader(document):
    check(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(EXAMPLE_TEXTS), st.data())
def test_mutated_examples_never_crash_the_loader(text, data):
    # Cut, duplicate or overwrite a slice of a real definition: close to valid, so the
    # deeper checks (expressions, variables, secrets) run on odd input too.
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    insert = data.draw(st.one_of(st.just(""), st.sampled_from(WORDS), st.text(max_size=6),
                                 st.just(text[start:end] * 2)))
    check(text[:start] + insert + text[end:])


def test_known_nasty_inputs_never_crash_the_loader():
    for text in ["[" * 5000, "{" * 5000, "a: &x [*x]", "? [a]\n: b", "\x00", "name: !!binary aGk=\n",
                 "--- a\n--- b\n", "tasks: [{type: card_production, <<: {card_template: EmployeeCard}}]",
                 "name: p\ntasks:\n  - type: card_production\n    card_template: EmployeeCard\n    fields: {1: a}",
                 "\ufeffname: p", "name: p\n\ttasks: []"]:
        check(text)
