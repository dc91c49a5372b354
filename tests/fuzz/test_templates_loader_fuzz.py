"""Property: whatever the template loader is given, it loads or raises TemplatesError whose
every violation is located (the source and a line >= 1). Nothing else may escape."""
from __future__ import annotations

import pathlib

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.domain.templates import (
    EXTENDED_KEY_USAGE_NAMES,
    KEY_TYPE_NAMES,
    KEY_USAGE_NAMES,
    CardTemplate,
    CertificateTemplate,
    TemplatesError,
    load_templates,
)

EXAMPLE = (pathlib.Path(__file__).resolve().parents[2] / "examples" / "templates" / "templates.yaml").read_text()

KEYS = ["certificate_templates", "card_templates", "description", "name", "ca", "key_type", "validity_days",
        "key_usage", "extended_key_usage", "state_graph", "internal_issued_state", "encoding", "produced_state",
        "failed_state"]
WORDS = [*KEY_TYPE_NAMES, *KEY_USAGE_NAMES, *EXTENDED_KEY_USAGE_NAMES, "local", "Issued", "Active", "On", "no",
         "EmployeeCard", "employee-card", " padded ", "", "730", "0x10", "1_000"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.sampled_from(WORDS), st.text(max_size=12))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=8)),
    max_leaves=40,
)
# Mostly the right keys with plausible values, so generated templates get past the first checks.
values = st.one_of(st.sampled_from(WORDS), st.integers(min_value=-2, max_value=40000), st.none(),
                   st.lists(st.sampled_from(WORDS), max_size=3))
template = st.fixed_dictionaries({}, optional={k: values for k in KEYS[3:]})


def check(text: str) -> None:
    try:
        certificates, cards = load_templates(text, "fuzz.yaml")
    except TemplatesError as e:
        assert e.violations
        for violation in e.violations:
            assert violation.source == "fuzz.yaml"
            assert isinstance(violation.line, int) and violation.line >= 1
            assert violation.message
            assert str(violation).startswith(f"fuzz.yaml:{violation.line}: ")
    else:
        assert all(isinstance(t, CertificateTemplate) and t.line >= 1 for t in certificates)
        assert all(isinstance(t, CardTemplate) and t.line >= 1 for t in cards)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_never_crashes_the_loader(text):
    check(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, structures, max_size=4))
def test_generated_yaml_structures_never_crash_the_loader(document):
    check(yaml.safe_dump(document, allow_unicode=True))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(template, max_size=3), st.lists(template, max_size=3))
def test_near_valid_templates_never_crash_the_loader(certificates, cards):
    check(yaml.safe_dump({"certificate_templates": certificates, "card_templates": cards}, allow_unicode=True))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(EXAMPLE)), st.integers(min_value=0, max_value=40), st.text(max_size=6))
def test_mangled_example_never_crashes_the_loader(start, length, insert):
    check(EXAMPLE[:start] + insert + EXAMPLE[start + length:])
