"""Property tests: the encoding-description parser never crashes on any input.

It either returns a description or raises EncodingError whose every violation is located:
a source, a line within the text (counted as an editor does, on "\\n") and a message.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.domain.encoding import (
    APPLICATION_KEYWORDS,
    DESCRIPTION_KEYWORDS,
    EncodingError,
    check_field_mapping,
    parse_apdu_script,
    parse_encoding,
)

SOURCE = "fuzz.ini"
TEMPLATES = ["EmployeeAuthentication", "EmployeeSignature"]
FIELDS = ["USER_PIN", "GeneratedCertApp_A", "OLD", "SCRIPT"]


def check(text: str, templates=TEMPLATES) -> None:
    n_lines = max(1, len(text.removeprefix("\ufeff").split("\n")))
    try:
        enc = parse_encoding(text, SOURCE, templates)
    except EncodingError as exc:
        assert exc.violations, "EncodingError without violations"
        for v in exc.violations:
            assert v.source == SOURCE
            assert 1 <= v.line <= n_lines, (v, n_lines)
            assert v.message.strip()
            assert str(v).startswith(f"{SOURCE}:{v.line}: ")
        return
    for w in enc.warnings:
        assert 1 <= w.line <= n_lines and w.message.strip()
    # a description that loads accepts the mapping of every field to its own variable
    mapping = {name: "${v_" + name + "}" for name in enc.field_names}
    assert check_field_mapping(enc, mapping, "p.yaml") == []


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_parses_or_is_rejected_with_located_violations(text):
    check(text)


@settings(max_examples=300)
@given(st.text(alphabet="[]=#;_\n\r AaEeTtCcPp0123456789\ufeff\t"))
def test_ini_punctuation_soup_parses_or_is_rejected_with_located_violations(text):
    check(text)


# -- structured generation: real sections and keywords, near misses, odd values ----------
# Mostly right (so that some descriptions load and the deeper checks run), sometimes a
# near miss: a keyword re-cased or with a letter dropped, doubled or swapped, a bad value.

def near_miss(word: str) -> st.SearchStrategy[str]:
    """Usually the word itself; otherwise re-cased, or a letter dropped, doubled or swapped."""
    def mutate(data):
        kind, i = data
        i %= max(1, len(word))
        if kind == 1:
            return word.swapcase()
        if kind == 2:
            return word[:i] + word[i + 1:]
        if kind == 3:
            return word[:i] + word[i:i + 1] * 2 + word[i + 1:]
        if kind == 4:
            return word[:i] + word[i + 1:i + 2] + word[i:i + 1] + word[i + 2:]
        return word
    return st.tuples(st.integers(0, 16), st.integers(0, 50)).map(mutate)


BOOL = ["true", "false"]
GOOD_VALUES = {
    "SetPIN": BOOL, "PIN": FIELDS, "InitialPUK": FIELDS, "NewPIN": FIELDS,
    "GenerateKeyPair": ["EC_P256", "RSA_2048", "RSA_3072"], "CertificateTemplate": TEMPLATES,
    "KeyLabel": ["Authentication"], "revokeOnIssue": BOOL, "ArchiveKey": BOOL,
    "CreateObjectRelation": ["always", "success", "never"], "ObjectRelationType": ["HAS_A"],
    "CertCoreObjectDescriptorReturnField": FIELDS, "RecoverCertificate": FIELDS,
    "WriteCertificate": BOOL, "Certificate": FIELDS, "WriteCertKeyList": BOOL, "CertKeyList": FIELDS,
    "DataObject": ["label=x"], "LabelExpressionDataObject": ["${name}"], "AttributesDataObject": ["a=b"],
    "ApduScript": ["00A4040007A0000000010101/9000;00B0000000/9000,61XX", "SCRIPT"], "DeleteObjects": BOOL,
}
BAD_VALUES = st.one_of(
    st.sampled_from(["", "True", "yes", "chip", "EC_P265", "Always", "EmployeeAuth", "USER_PN",
                     "00A4;", "00B0000000/9", "a;b#c", "${x}"]),
    st.text(max_size=20),
)


def entry(keywords) -> st.SearchStrategy[str]:
    def line(keyword):
        key = near_miss(keyword)
        value = st.one_of(*[st.sampled_from(GOOD_VALUES[keyword])] * 4, BAD_VALUES)
        return st.tuples(key, st.sampled_from(["=", " = ", "=", "", "=="]), value).map("".join)
    return st.one_of(*[st.sampled_from(keywords).flatmap(line)] * 6, st.text(max_size=15),
                     st.sampled_from(["# comment", "; comment", "", "   "]))


# A valid description to start from, then a few mutations. Hypothesis often draws no
# mutation at all, so many descriptions load and the checks on loaded ones run too.
RECIPES = [
    ["GenerateKeyPair=EC_P256", "CertificateTemplate=EmployeeAuthentication"],
    ["GenerateKeyPair=RSA_2048", "CertificateTemplate=EmployeeSignature", "KeyLabel=Sig",
     "revokeOnIssue=true", "CreateObjectRelation=always", "ObjectRelationType=HAS_A",
     "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A"],
    ["ArchiveKey=true", "CertificateTemplate=EmployeeSignature"],
    ["RecoverCertificate=OLD", "CreateObjectRelation=never",
     "CertCoreObjectDescriptorReturnField=GeneratedCertApp_A"],      # warns (C7)
    ["WriteCertificate=true", "Certificate=OLD"],
    ["DataObject=label=x", "KeyLabel=unused"],                        # warns
    ["ApduScript=00A4040007A0000000010101/9000;00B0000000/9000,61XX"],
    ["ApduScript=SCRIPT"],
    ["DeleteObjects=true"],
]


@st.composite
def valid_description(draw) -> list[str]:
    lines = ["[Encoding]", "Type=Chip", "[Fields]", *(f + "=" for f in FIELDS)]
    if draw(st.booleans()):
        lines += ["[Description]", "SetPIN=true", "PIN=USER_PIN", "InitialPUK=OLD"]
    suffixes = draw(st.lists(st.sampled_from(["A", "B", "C", "D", "2", "10", "a"]), min_size=1, max_size=4,
                             unique=True))
    for suffix in suffixes:
        lines += [f"[Application_{suffix}]", *draw(st.sampled_from(RECIPES))]
    return lines


@st.composite
def mutated(draw, lines: list[str]) -> list[str]:
    """One edit: insert, drop, duplicate or misspell a line, or give a keyword a bad value."""
    lines = list(lines) or [""]
    i = draw(st.integers(0, len(lines) - 1))
    kind = draw(st.sampled_from(["insert", "drop", "duplicate", "misspell", "bad value", "header"]))
    if kind == "insert":
        lines.insert(i, draw(entry(APPLICATION_KEYWORDS + DESCRIPTION_KEYWORDS)))
    elif kind == "drop":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(draw(st.integers(0, len(lines))), lines[i])
    elif kind == "misspell":
        key, eq, value = lines[i].partition("=")
        lines[i] = draw(near_miss(key.strip("[]"))).join(["[", "]"] if not eq else ["", ""]) + eq + value
    elif kind == "bad value" and "=" in lines[i]:
        lines[i] = lines[i].partition("=")[0] + "=" + draw(BAD_VALUES)
    elif kind == "header":
        lines.insert(i, "[" + draw(st.one_of(near_miss("Application_A"), near_miss("Description"),
                                             st.text(max_size=8))) + draw(st.sampled_from(["]", ""])))
    return lines


@st.composite
def descriptions(draw) -> str:
    lines = draw(valid_description())
    for _ in range(draw(st.integers(0, 4))):
        lines = draw(mutated(lines))
    text = "\n".join(lines)
    return text.replace("\n", "\r\n") if draw(st.booleans()) else text


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(descriptions(), st.booleans())
def test_structured_descriptions_parse_or_are_rejected_with_located_violations(text, check_templates):
    check(text, TEMPLATES if check_templates else None)


@settings(max_examples=300)
@given(st.text(alphabet="0123456789ABCDEFXabcdefx;/, G"))
def test_apdu_scripts_parse_or_raise_value_error(text):
    try:
        apdus = parse_apdu_script(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert apdus and all(len(a.command) >= 4 and a.expected_sw for a in apdus)
