"""Subject patterns and subjectAltName rules of certificate templates (docs/templates.md,
"Subject and subjectAltNames"): reading them, rendering them with a task's variables, the
loader's and the configuration's located errors, and the CA issuing exactly the rendered
content whatever the request carries (a hypothesis property, on the local CA)."""
from __future__ import annotations

import pathlib
import shutil
import string
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.ca.base import (
    SAN_BUILDERS,
    SUBJECT_ATTRIBUTES,
    UPN_OID,
    IssueProfile,
    requested_beyond,
    subject_name,
)
from orchestrator.ca.local import LocalCa
from orchestrator.domain.certificate_content import (
    SAN_KINDS,
    SUBJECT_ATTRIBUTE_NAMES,
    ContentError,
    parse_san_rule,
    parse_subject_pattern,
)
from orchestrator.domain.templates import TemplatesError, load_templates
from orchestrator.services.configuration import RejectedConfiguration, load_configuration
from shared.errors import InvalidArgument

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
KEY = ec.generate_private_key(ec.SECP256R1())


def csr(subject: x509.Name, *extensions: x509.ExtensionType) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(KEY, hashes.SHA256())


def der(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.DER)


# --- the name lists of the domain and the CA layer ------------------------------------------

def test_pattern_attribute_and_san_kind_names_match_the_ca_layers():
    assert tuple(SUBJECT_ATTRIBUTES) == SUBJECT_ATTRIBUTE_NAMES
    assert tuple(SAN_BUILDERS) == SAN_KINDS


# --- subject patterns ----------------------------------------------------------------------

def test_subject_pattern_reads_rdns_in_written_order_with_variables_in_values():
    pattern = parse_subject_pattern("CN=${person},OU=Staff+title=${role},O=Example\\, Inc.,C=DE")
    assert pattern.rdns == ((("CN", "${person}"),), (("OU", "Staff"), ("title", "${role}")),
                            (("O", "Example, Inc."),), (("C", "DE"),))
    assert pattern.variables == ("person", "role")


@pytest.mark.parametrize(("text", "message"), [
    ("", "names at least one attribute"),
    ("CNN=${person}", "unknown subject attribute 'CNN' (did you mean 'CN'?)"),
    ("${attribute}=x", "unknown subject attribute '${attribute}'"),
    ("CN", "'CN' is not TYPE=VALUE"),
    ("CN=a,,O=b", "empty RDN"),
    ("CN=a+", "empty attribute"),
    ("CN=", "attribute CN has no value"),
    ("CN=a\\q", "'\\q' is not an escape"),
    ("C=Germany", "attribute C: 'Germany' has 7 bytes in UTF-8, at most 2"),
    ("CN=${first name}", "'first name' in '${first name}' is not a variable name"),
    ("CN=${person", "never closed"),
])
def test_bad_subject_pattern_is_refused_saying_what_is_wrong(text, message):
    with pytest.raises(ContentError) as caught:
        parse_subject_pattern(text)
    assert message in str(caught.value)


def test_variable_value_with_dn_syntax_stays_one_attribute_value():
    """An input such as `Doe, John+CN=Evil` fills one common name; it never adds an attribute."""
    pattern = parse_subject_pattern("CN=${person},O=Example")
    name = subject_name(pattern.render({"person": "Doe, John+CN=Evil,O=Root"}))
    assert [(a.oid, a.value) for a in name] == [(NameOID.ORGANIZATION_NAME, "Example"),
                                                (NameOID.COMMON_NAME, "Doe, John+CN=Evil,O=Root")]
    assert x509.Name.from_rfc4514_string(name.rfc4514_string()) == name


def test_rendering_names_the_missing_variable_and_bounds_what_it_echoes():
    pattern = parse_subject_pattern("CN=${person},O=Example")
    with pytest.raises(ContentError, match="'person' has no value"):
        pattern.render({})
    with pytest.raises(ContentError, match="at most 64") as caught:
        pattern.render({"person": "x" * 5000})
    assert len(str(caught.value)) < 200                    # errors never echo unbounded input


# --- subjectAltName rules ------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "value", "message"), [
    ("mail", "a@b.c", "unknown subjectAltName kind 'mail' (did you mean 'email'?)"),
    ("email", "not an address", "is not NAME@DOMAIN"),
    ("dns", "bad host.example", "is not a host name"),
    ("dns", "-x.example", "is not a host name"),
    ("uri", "no-scheme", "is not a URI"),
    ("uri", "https://a b", "is not a URI"),
    ("email", "jörg@example.com", "is not ASCII"),
    ("upn", "${login", "never closed"),
])
def test_bad_san_rule_is_refused_saying_what_is_wrong(kind, value, message):
    with pytest.raises(ContentError) as caught:
        parse_san_rule(kind, value)
    assert message in str(caught.value)


def test_san_rules_render_to_general_names_upn_as_utf8_other_name():
    rules = [parse_san_rule("email", "${mail}"), parse_san_rule("dns", "${host}.example.org"),
             parse_san_rule("uri", "urn:uuid:${card_id}"), parse_san_rule("upn", "${login}@corp.example")]
    values = {"mail": "jane@example.org", "host": "ws-12", "card_id": "1234", "login": "jörg"}
    profile = IssueProfile(validity_days=1, subject="CN=x", subject_alt_names=tuple(r.render(values) for r in rules))
    san = profile.x509_subject_alt_name()
    assert san is not None
    assert list(san)[:3] == [x509.RFC822Name("jane@example.org"), x509.DNSName("ws-12.example.org"),
                             x509.UniformResourceIdentifier("urn:uuid:1234")]
    upn = list(san)[3]
    assert isinstance(upn, x509.OtherName) and upn.type_id == UPN_OID
    assert upn.value == b"\x0c" + bytes([len("jörg@corp.example".encode())]) + "jörg@corp.example".encode()
    with pytest.raises(ContentError, match="is not NAME@DOMAIN"):
        rules[0].render({"mail": "jane"})


def test_profile_naming_nobody_is_refused():
    with pytest.raises(InvalidArgument, match="name nobody"):
        IssueProfile(validity_days=1, subject="")


# --- what a request asks for beyond its key ------------------------------------------------

def test_honest_request_asks_for_nothing_more():
    profile = IssueProfile(validity_days=1, subject="CN=Jane Doe,O=Example", subject_alt_names=(("email", "j@x.org"),))
    request = csr(x509.Name.from_rfc4514_string("CN=Jane Doe,O=Example"),
                  x509.SubjectAlternativeName([x509.RFC822Name("j@x.org")]))
    assert requested_beyond(request, profile) == {}


def test_request_asking_for_more_is_described_bounded():
    profile = IssueProfile(validity_days=1, subject="CN=Jane Doe")
    many = [x509.DNSName(f"host{i}.example") for i in range(20)]
    request = csr(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "E" * 64)] * 30),
                  x509.SubjectAlternativeName(many), x509.BasicConstraints(ca=True, path_length=None))
    asked = requested_beyond(request, profile)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "E" * 64)] * 30).rfc4514_string()
    assert asked["subject"] == f"{repr(subject)[:200]}... ({len(subject)} characters)"
    assert len(asked["subject_alt_names"]) == 8 and asked["subject_alt_names_not_shown"] == 12
    assert "host0.example" in asked["subject_alt_names"][0]
    assert asked["extensions"] == ["2.5.29.19"]


# --- the template loader -------------------------------------------------------------------

TEMPLATE = """\
certificate_templates:
  - name: Badge
    ca: local
    key_type: EC_P256
    validity_days: 30
    key_usage: [digitalSignature]
    subject: "{subject}"
    subject_alt_names:
      - {san}
    state_graph: EmployeeCertificate
    internal_issued_state: Issued
"""


def test_template_with_pattern_and_rules_loads():
    [template], _ = load_templates(TEMPLATE.format(subject="CN=${person},O=Example", san='email: "${mail}"'),
                                   "t.yaml")
    assert template.subject is not None and template.subject.variables == ("person",)
    assert [(r.kind, r.pattern) for r in template.subject_alt_names] == [("email", "${mail}")]
    assert template.content_variables == ("person", "mail")
    assert template.line_of("subject") == 7


@pytest.mark.parametrize(("subject", "san", "where", "message"), [
    ("CN=${person},XX=1", 'email: "${mail}"', "t.yaml:7: certificate_templates[0].subject:",
     "unknown subject attribute 'XX'"),
    ("CN=${person}", 'mail: "${mail}"', "t.yaml:9: certificate_templates[0].subject_alt_names[0].mail:",
     "unknown subjectAltName kind 'mail' (did you mean 'email'?)"),
    ("CN=${person}", '"${mail}"', "t.yaml:9: certificate_templates[0].subject_alt_names[0]:",
     "expected one KIND: VALUE"),
])
def test_bad_pattern_or_rule_is_a_located_template_error(subject, san, where, message):
    with pytest.raises(TemplatesError) as caught:
        load_templates(TEMPLATE.format(subject=subject, san=san), "t.yaml")
    [violation] = caught.value.violations
    assert str(violation).startswith(where) and message in str(violation)


# --- variables checked against the processes issuing a template ------------------------------

def configuration_with(tmp_path, auth_subject: str) -> pathlib.Path:
    target = tmp_path / "config"
    shutil.copytree(EXAMPLES, target)
    path = target / "templates" / "templates.yaml"
    text = path.read_text()
    marker = "    extended_key_usage: [clientAuth]\n"
    path.write_text(text.replace(marker, marker + f'    subject: "{auth_subject}"\n', 1))
    return target


def test_unknown_variable_is_located_at_the_template_naming_the_process(tmp_path):
    conf = configuration_with(tmp_path, "CN=${persn},O=Example")
    with pytest.raises(RejectedConfiguration) as caught:
        load_configuration(conf)
    texts = [str(v) for v in caught.value.violations]
    templates = conf / "templates" / "templates.yaml"
    line = templates.read_text().splitlines().index('    subject: "CN=${persn},O=Example"') + 1
    produce = [t for t in texts if "'produce-employee-card'" in t]
    assert produce and produce[0].startswith(f"{templates}:{line}: subject: certificate template "
                                             "'EmployeeAuthentication': variable 'persn' is neither built in nor "
                                             "an input of process 'produce-employee-card'")
    assert "(did you mean 'person'?)" in produce[0]


def test_secret_input_in_a_certificate_is_refused(tmp_path):
    conf = configuration_with(tmp_path, "CN=${person} ${pin},O=Example")
    with pytest.raises(RejectedConfiguration) as caught:
        load_configuration(conf)
    assert any("variable 'pin' is a secret input of process 'produce-employee-card'" in str(v)
               for v in caught.value.violations)


def test_variable_of_a_template_no_process_issues_must_be_built_in(tmp_path):
    conf = tmp_path / "config"
    shutil.copytree(EXAMPLES, conf)
    (conf / "templates" / "lonely.yaml").write_text(TEMPLATE.format(subject="CN=${holder} ${team}",
                                                                    san='uri: "urn:uuid:${card_id}"'))
    with pytest.raises(RejectedConfiguration) as caught:
        load_configuration(conf)
    [violation] = caught.value.violations
    assert str(violation).startswith(f"{conf / 'templates' / 'lonely.yaml'}:7: subject: certificate template "
                                     "'Badge': unknown variable 'team'")


# --- the property: whatever the request carries, the certificate says the template's ---------

# Values a CN can hold: at most 64 bytes in UTF-8 (the attacker's CSR must be a valid one too).
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                max_size=40).filter(lambda v: len(v.encode("utf-8")) <= 64)
_names = st.lists(st.sampled_from([x509.DNSName("orchestrator.example"), x509.RFC822Name("ceo@example.com"),
                                   x509.UniformResourceIdentifier("https://evil.example/")]), unique=True)


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory) -> LocalCa:
    return LocalCa(tmp_path_factory.mktemp("ca"), name="property")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(person=_text.filter(lambda v: v.strip() != ""), team=st.text(string.ascii_letters, min_size=1, max_size=10),
       csr_cn=_text, csr_names=_names, ask_ca=st.booleans())
def test_issued_subject_is_the_rendered_template_subject_whatever_the_request_carries(
        local_ca, person, team, csr_cn, csr_names, ask_ca):
    pattern = parse_subject_pattern("CN=${person},OU=${team}+title=Member,O=Example")
    rule = parse_san_rule("uri", "urn:example:team:${team}")
    variables = {"person": person, "team": team}
    expected = subject_name(pattern.render(variables))
    profile = IssueProfile(validity_days=1, subject=expected, subject_alt_names=(rule.render(variables),))
    extensions: list[x509.ExtensionType] = [x509.SubjectAlternativeName(csr_names)] if csr_names else []
    if ask_ca:
        extensions.append(x509.BasicConstraints(ca=True, path_length=None))
    request = csr(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, csr_cn)]), *extensions)
    cert = x509.load_der_x509_certificate(local_ca.issue(der(request), profile, f"prop-{uuid.uuid4()}"))
    assert cert.subject == expected
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == \
        [x509.UniformResourceIdentifier(f"urn:example:team:{team}")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
