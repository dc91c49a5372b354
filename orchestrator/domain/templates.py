"""Certificate and card templates: plain values, and the loader of template files (YAML).

A template file (format: docs/templates.md) lists `certificate_templates` (which CA, key
type, validity, key usage, state graph and internal issued state of a certificate) and
`card_templates` (card state graph, encoding description, the card states a production
ends in). Loading reports every problem of the file at once, each located by file, line and
field path, with a "did you mean" for a misspelled key or name.

What a single file cannot know — whether the state graphs, encodings and CAs it names
exist, and rule C14 — is checked by orchestrator/services/configuration.py, which loads all
configuration files together.

`embedded_defaults()` is what a bare orchestrator without configuration files used; the
examples/ directory holds the same templates as files.

Pure domain code: PyYAML only.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.domain.certificate_content import (
    ContentError,
    SanRule,
    SubjectPattern,
    parse_san_rule,
    parse_subject_pattern,
)
from orchestrator.domain.located_yaml import INT_TAG, Entries, LocatedReader, excerpt, line_of
from orchestrator.domain.violations import Violation, suggest
from shared.cards import KeyType
from shared.errors import TemplateNotFound
from shared.transport_puk import DEFAULT_LENGTH as DEFAULT_PUK_LENGTH
from shared.transport_puk import DIGITS
from shared.transport_puk import format_problem as transport_puk_format_problem

DEFAULT_INTERNAL_ISSUED_STATE = "Issued"
DEFAULT_RELATION_TYPE = "HAS_CERTIFICATE"

#: RFC 5280 §4.2.1.3 key usage names the CA connectors understand. A copy of the keys of
#: orchestrator/ca/base.py KEY_USAGES (the domain does not import the CA layer, which pulls
#: in `cryptography`); tests/unit/test_templates.py keeps the two equal.
KEY_USAGE_NAMES = (
    "digitalSignature", "nonRepudiation", "contentCommitment", "keyEncipherment", "dataEncipherment",
    "keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly",
)
#: Extended key usage names (OpenSSL short names); a copy of the keys of
#: orchestrator/ca/base.py EXTENDED_KEY_USAGES.
EXTENDED_KEY_USAGE_NAMES = (
    "serverAuth", "clientAuth", "codeSigning", "emailProtection", "timeStamping", "OCSPSigning",
    "smartcardLogon",
)
KEY_TYPE_NAMES = tuple(k.value for k in KeyType)

#: Longest validity accepted (100 years): anything longer is a typo, not a policy.
MAX_VALIDITY_DAYS = 36500


def _lines(mapping: Mapping[str, int] | None = None) -> Mapping[str, int]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class CertificateTemplate:
    name: str
    ca: str
    key_type: KeyType
    validity_days: int
    key_usage: frozenset[str]
    extended_key_usage: tuple[str, ...] = ()
    state_graph: str = ""
    start_state: str = "Active"             # the start state of its state graph
    # The internal issued state the template configures (C14); "" when a loaded file does
    # not configure it (load_configuration then refuses to start).
    internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE
    description: str = ""
    # What the certificate says (certificate_content.py): the subject pattern (None: the
    # task's subject) and the subjectAltName rules (none: no subjectAltName). Never the CSR's.
    subject: SubjectPattern | None = None
    subject_alt_names: tuple[SanRule, ...] = ()
    # Where it was loaded from: file, line of its `name`, line of each key (for checks that
    # need the other configuration files, and for messages).
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)
    lines: Mapping[str, int] = field(default_factory=_lines, compare=False, repr=False, hash=False)

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)

    @property
    def content_variables(self) -> tuple[str, ...]:
        """Every variable its subject pattern and subjectAltName rules read, in order."""
        found = list(self.subject.variables if self.subject else ())
        for rule in self.subject_alt_names:
            found.extend(rule.variables)
        return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class CardTemplate:
    name: str
    encoding: str = ""                      # name of its encoding description
    state_graph: str = ""
    initial_state: str = "InProduction"     # the start state of its state graph
    produced_state: str = "Active"
    failed_state: str = "ProductionFailed"
    # The key the PUKs (SO PINs) of this template's blank cards are diversified from, one per
    # card by its token serial (shared/transport_puk.py): SetPIN authenticates with the PUK of
    # the card in the reader. A file in secrets_dir, never the key itself in the configuration.
    transport_puk_key_file: str = ""
    transport_puk_alphabet: str = DIGITS
    transport_puk_length: int = DEFAULT_PUK_LENGTH
    description: str = ""
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)
    lines: Mapping[str, int] = field(default_factory=_lines, compare=False, repr=False, hash=False)

    def line_of(self, key: str) -> int:
        return self.lines.get(key, self.line)


@dataclass
class Templates:
    certificates: dict[str, CertificateTemplate] = field(default_factory=dict)
    cards: dict[str, CardTemplate] = field(default_factory=dict)
    internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE

    def certificate(self, name: str) -> CertificateTemplate:
        try:
            return self.certificates[name]
        except KeyError:
            known = ", ".join(sorted(self.certificates)) or "none"
            raise TemplateNotFound(f"no certificate template {name!r} (known: {known})", template=name) from None

    def card(self, name: str) -> CardTemplate:
        try:
            return self.cards[name]
        except KeyError:
            known = ", ".join(sorted(self.cards)) or "none"
            raise TemplateNotFound(f"no card template {name!r} (known: {known})", template=name) from None


def embedded_defaults() -> Templates:
    """The templates of examples/templates/templates.yaml, as code (kept for callers that
    run without configuration files)."""
    return Templates(
        certificates={t.name: t for t in [
            CertificateTemplate("EmployeeAuthentication", ca="local", key_type=KeyType.EC_P256, validity_days=730,
                                key_usage=frozenset({"digitalSignature"}), extended_key_usage=("clientAuth",),
                                state_graph="EmployeeCertificate"),
            CertificateTemplate("EmployeeSignature", ca="local", key_type=KeyType.RSA_2048, validity_days=730,
                                key_usage=frozenset({"digitalSignature", "nonRepudiation"}),
                                extended_key_usage=("emailProtection",), state_graph="EmployeeCertificate"),
            CertificateTemplate("EmployeeEncryption", ca="local", key_type=KeyType.RSA_2048, validity_days=730,
                                key_usage=frozenset({"keyEncipherment"}), extended_key_usage=("emailProtection",),
                                state_graph="EmployeeCertificate"),
        ]},
        cards={"EmployeeCard": CardTemplate("EmployeeCard", encoding="employee-card", state_graph="EmployeeCard")},
    )


# --------------------------------------------------------------------------- loading


class TemplatesError(ValueError):
    """A template file is invalid; `violations` lists every problem, in line order."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = sorted(violations, key=lambda v: (v.source, v.line, v.field_path, v.message))
        count = len(self.violations)
        lines = "\n".join(f"  {v}" for v in self.violations)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in templates:\n{lines}")


@dataclass(frozen=True)
class TemplateFile:
    """What one template file yields, also when it has problems.

    `certificates` / `cards` hold the templates that are valid; `certificate_names` /
    `card_names` every name the file declares, valid or not — so that other files naming a
    broken template are not also told it does not exist.
    """

    source: str
    certificates: tuple[CertificateTemplate, ...]
    cards: tuple[CardTemplate, ...]
    certificate_names: frozenset[str]
    card_names: frozenset[str]
    violations: tuple[Violation, ...]


_TOP_KEYS = ("certificate_templates", "card_templates", "description")
_CERTIFICATE_KEYS = ("name", "ca", "key_type", "validity_days", "key_usage", "extended_key_usage",
                     "subject", "subject_alt_names", "state_graph", "internal_issued_state", "description")
_CERTIFICATE_REQUIRED = ("name", "ca", "key_type", "validity_days", "key_usage", "state_graph")
_CARD_KEYS = ("name", "state_graph", "encoding", "produced_state", "failed_state", "transport_puk_key_file",
              "transport_puk_alphabet", "transport_puk_length", "description")
_CARD_REQUIRED = ("name", "state_graph", "encoding", "produced_state", "failed_state")


def load_templates(text: str, source: str) -> tuple[list[CertificateTemplate], list[CardTemplate]]:
    """Parses one template file; raises TemplatesError listing every violation."""
    parsed = read_templates(text, source)
    if parsed.violations:
        raise TemplatesError(list(parsed.violations))
    return list(parsed.certificates), list(parsed.cards)


def read_templates(text: str, source: str) -> TemplateFile:
    """Parses one template file, returning its valid templates and every violation."""
    r = _Reader(source)
    root = r.compose(text, "empty file; expected certificate_templates and/or card_templates")
    certificates: list[CertificateTemplate] = []
    cards: list[CardTemplate] = []
    if root is not None:
        top = r.mapping(root, "", _TOP_KEYS)
        if top is not None:
            if not any(k in top for k in ("certificate_templates", "card_templates")):
                r.report(root, "", "declares no templates; expected certificate_templates and/or card_templates")
            if "description" in top:
                r.text(top["description"][1], "description")
            for i, item in r.items(top, "certificate_templates"):
                template = r.certificate(item, f"certificate_templates[{i}]")
                if template is not None:
                    certificates.append(template)
            for i, item in r.items(top, "card_templates"):
                card = r.card(item, f"card_templates[{i}]")
                if card is not None:
                    cards.append(card)
    return TemplateFile(source, tuple(certificates), tuple(cards), frozenset(r.names["certificate"]),
                        frozenset(r.names["card"]),
                        tuple(sorted(r.violations, key=lambda v: (v.line, v.field_path, v.message))))


class _Reader(LocatedReader):
    """Walks the composed YAML nodes (they carry line numbers) and collects violations."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.names: dict[str, dict[str, int]] = {"certificate": {}, "card": {}}   # name -> line

    def mapping(self, node: Node, path: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> Entries | None:
        """Entries of a mapping by key; bad, duplicate, unknown and missing keys reported.
        A key with no value counts as absent."""
        return self.entries(node, path, allowed, required)

    def items(self, top: Entries, key: str) -> list[tuple[int, Node]]:
        if key not in top:
            return []
        node = top[key][1]
        if not isinstance(node, SequenceNode):
            self.report(node, key, f"expected a list of templates, found {excerpt(node)}")
            return []
        return list(enumerate(node.value))

    def name(self, node: Node, path: str) -> str | None:
        """A name, taken literally from the text (a state `On` stays a name, not a boolean)."""
        if not isinstance(node, ScalarNode):
            self.report(node, path, f"expected a name, found {excerpt(node)}")
            return None
        value = str(node.value)
        if not value.strip():
            self.report(node, path, "expected a name, found nothing")
            return None
        if value != value.strip():
            self.report(node, path, f"name {value!r} has leading or trailing blanks")
            return None
        if "\n" in value:
            self.report(node, path, "a name is a single line")
            return None
        return value

    def text(self, node: Node, path: str) -> str | None:
        if not isinstance(node, ScalarNode):
            self.report(node, path, f"expected text, found {excerpt(node)}")
            return None
        return str(node.value)

    def choice(self, node: Node, path: str, allowed: tuple[str, ...], what: str) -> str | None:
        value = self.name(node, path)
        if value is None:
            return None
        if value not in allowed:
            self.report(node, path, f"unknown {what} {value!r}; allowed: {', '.join(allowed)}",
                        suggest(value, allowed))
            return None
        return value

    def choices(self, node: Node, path: str, allowed: tuple[str, ...], what: str,
                allow_empty: bool) -> tuple[str, ...] | None:
        """A list of names from `allowed` (a single name is accepted as a list of one)."""
        items = node.value if isinstance(node, SequenceNode) else [node]
        if isinstance(node, SequenceNode) and not items and not allow_empty:
            self.report(node, path, f"expected at least one {what}, found an empty list")
            return None
        found: list[str] = []
        ok = True
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            value = self.choice(item, item_path, allowed, what)
            if value is None:
                ok = False
            elif value in found:
                self.report(item, item_path, f"{what} {value!r} is listed twice")
                ok = False
            else:
                found.append(value)
        return tuple(found) if ok else None

    def declare(self, kind: str, name: str, node: Node, path: str) -> None:
        names = self.names[kind]
        if name in names:
            self.report(node, path, f"{kind} template {name!r} is already defined at line {names[name]}")
        else:
            names[name] = line_of(node)

    # -- the two kinds of template ------------------------------------------------------

    def certificate(self, node: Node, path: str) -> CertificateTemplate | None:
        before = len(self.violations)
        entries = self.mapping(node, path, _CERTIFICATE_KEYS, _CERTIFICATE_REQUIRED)
        if entries is None:
            return None
        v: dict[str, Any] = {}
        name = self.name(entries["name"][1], f"{path}.name") if "name" in entries else None
        if name is not None:
            self.declare("certificate", name, entries["name"][1], f"{path}.name")
        for key in ("ca", "state_graph", "internal_issued_state"):
            if key in entries:
                v[key] = self.name(entries[key][1], f"{path}.{key}")
        if "key_type" in entries:
            key_type = self.choice(entries["key_type"][1], f"{path}.key_type", KEY_TYPE_NAMES, "key type")
            v["key_type"] = KeyType(key_type) if key_type else None
        if "validity_days" in entries:
            v["validity_days"] = self.validity(entries["validity_days"][1], f"{path}.validity_days")
        if "key_usage" in entries:
            usage = self.choices(entries["key_usage"][1], f"{path}.key_usage", KEY_USAGE_NAMES, "key usage",
                                 allow_empty=False)
            v["key_usage"] = frozenset(usage) if usage is not None else None
        if "extended_key_usage" in entries:
            v["extended_key_usage"] = self.choices(entries["extended_key_usage"][1], f"{path}.extended_key_usage",
                                                   EXTENDED_KEY_USAGE_NAMES, "extended key usage",
                                                   allow_empty=True)
        if "description" in entries:
            v["description"] = self.text(entries["description"][1], f"{path}.description")
        if "subject" in entries:
            v["subject"] = self.subject_pattern(entries["subject"][1], f"{path}.subject")
        if "subject_alt_names" in entries:
            v["subject_alt_names"] = self.san_rules(entries["subject_alt_names"][1], f"{path}.subject_alt_names")
        if len(self.violations) != before or name is None:
            return None
        v.setdefault("internal_issued_state", "")          # not configured: C14 decides
        v.setdefault("extended_key_usage", ())
        v.setdefault("description", "")
        return CertificateTemplate(name=name, source=self.source, line=line_of(entries["name"][1]),
                                   lines=_lines({k: line_of(val) for k, (_key, val) in entries.items()}), **v)

    def subject_pattern(self, node: Node, path: str) -> SubjectPattern | None:
        text = self.text(node, path)
        if text is None:
            return None
        try:
            return parse_subject_pattern(text)
        except ContentError as exc:
            self.report(node, path, f"subject pattern {excerpt(node)}: {exc}")
            return None

    def san_rules(self, node: Node, path: str) -> tuple[SanRule, ...] | None:
        """A list of one-key mappings, `- email: "${email}"`."""
        if not isinstance(node, SequenceNode):
            self.report(node, path, f"expected a list of rules such as '- email: \"${{email}}\"', "
                                    f"found {excerpt(node)}")
            return None
        rules: list[SanRule] = []
        ok = True
        for i, item in enumerate(node.value):
            item_path = f"{path}[{i}]"
            if not isinstance(item, MappingNode) or len(item.value) != 1:
                self.report(item, item_path, f"expected one KIND: VALUE (KIND one of email, dns, uri, upn), "
                                             f"found {excerpt(item)}")
                ok = False
                continue
            key_node, value_node = item.value[0]
            kind, pattern = self.name(key_node, item_path), self.text(value_node, f"{item_path}.{key_node.value}")
            if kind is None or pattern is None:
                ok = False
                continue
            try:
                rules.append(parse_san_rule(kind, pattern))
            except ContentError as exc:
                self.report(value_node, f"{item_path}.{kind}", str(exc))
                ok = False
        return tuple(rules) if ok else None
    def whole_number(self, node: Node, path: str) -> int | None:
        if isinstance(node, ScalarNode) and node.tag == INT_TAG:
            value = yaml.safe_load(node.value)
            if isinstance(value, int):
                return value
        self.report(node, path, f"expected a whole number, found {excerpt(node)}")
        return None

    def validity(self, node: Node, path: str) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == INT_TAG):
            self.report(node, path, f"expected a whole number of days, found {excerpt(node)}")
            return None
        try:
            days = int(yaml.safe_load(node.value))
        except (ValueError, TypeError, yaml.YAMLError):
            self.report(node, path, f"expected a whole number of days, found {excerpt(node)}")
            return None
        if not 1 <= days <= MAX_VALIDITY_DAYS:
            self.report(node, path, f"validity must be between 1 and {MAX_VALIDITY_DAYS} days, found {days}")
            return None
        return days

    def card(self, node: Node, path: str) -> CardTemplate | None:
        before = len(self.violations)
        entries = self.mapping(node, path, _CARD_KEYS, _CARD_REQUIRED)
        if entries is None:
            return None
        v: dict[str, Any] = {}
        name = self.name(entries["name"][1], f"{path}.name") if "name" in entries else None
        if name is not None:
            self.declare("card", name, entries["name"][1], f"{path}.name")
        for key in ("state_graph", "encoding", "produced_state", "failed_state"):
            if key in entries:
                v[key] = self.name(entries[key][1], f"{path}.{key}")
        for key in ("description", "transport_puk_key_file", "transport_puk_alphabet"):
            if key in entries:
                v[key] = self.text(entries[key][1], f"{path}.{key}")
        if "transport_puk_length" in entries:
            v["transport_puk_length"] = self.whole_number(entries["transport_puk_length"][1],
                                                          f"{path}.transport_puk_length")
        for key in ("transport_puk_length", "transport_puk_alphabet"):     # the shape, reported once
            if key in entries and v.get(key) is not None:
                problem = transport_puk_format_problem(v.get("transport_puk_alphabet") or DIGITS,
                                                       v.get("transport_puk_length") or DEFAULT_PUK_LENGTH)
                if problem:
                    self.report(entries[key][1], f"{path}.{key}", problem)
                break
        if v.get("produced_state") and v.get("produced_state") == v.get("failed_state"):
            self.report(entries["failed_state"][1], f"{path}.failed_state",
                        f"a failed production must not end in the produced state {v['produced_state']!r}")
        if len(self.violations) != before or name is None:
            return None
        return CardTemplate(name=name, source=self.source, line=line_of(entries["name"][1]),
                            lines=_lines({k: line_of(val) for k, (_key, val) in entries.items()}), **v)
