"""What a certificate says: the subject pattern and subjectAltName rules of a certificate
template, and their rendering with a task's variables (docs/templates.md, "Subject and
subjectAltNames").

The orchestrator decides a certificate's content; a card's request (CSR) contributes only its
public key and the proof of possession. A pattern is parsed once, when the template loads,
into attributes whose *types* are fixed text and whose *values* are `${name}` expressions:
a variable's value is put into one attribute value as it is, so an input such as
`Doe,CN=Evil` stays one common name and never adds an attribute.

Pure domain code: no `cryptography` (orchestrator/ca/base.py turns the rendered parts into an
x509 name and general names; tests/unit/test_certificate_content.py keeps the name lists of
both equal).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.domain.processes.expressions import ExpressionError, render, variables_in
from orchestrator.domain.violations import did_you_mean

#: Subject attribute types a pattern may name (RFC 4514 / OpenSSL short names), with the
#: longest value RFC 5280 (Appendix A, upper bounds) allows; a copy of the keys of
#: orchestrator/ca/base.py SUBJECT_ATTRIBUTES.
SUBJECT_ATTRIBUTE_BOUNDS: Mapping[str, int] = {
    "CN": 64, "O": 64, "OU": 64, "C": 2, "L": 128, "ST": 128, "STREET": 128, "DC": 63, "UID": 256,
    "emailAddress": 255, "serialNumber": 64, "GN": 64, "SN": 64, "title": 64,
}
SUBJECT_ATTRIBUTE_NAMES = tuple(SUBJECT_ATTRIBUTE_BOUNDS)

#: subjectAltName kinds a rule may give: rfc822Name, dNSName, URI, and the Microsoft UPN
#: (otherName 1.3.6.1.4.1.311.20.2.3, smart card logon).
SAN_KINDS = ("email", "dns", "uri", "upn")
MAX_SAN_LENGTH = 255

#: Variables every card task gives a pattern, whatever its process: the card's holder (the
#: production's `holder:`, or the stored card's) and the card object's id.
BUILTIN_VARIABLES = ("card_id", "holder")

#: The characters a pattern escapes with a backslash to write them literally (RFC 4514 §2.4).
_ESCAPABLE = ',+"\\<>;=# '
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\Z")


class ContentError(ValueError):
    """A pattern or rule that cannot be read, or a value it renders that a certificate cannot carry."""


#: One attribute of a subject: (type, value); one RDN: its attributes; a subject: its RDNs,
#: in the order they are written (most specific first, as RFC 4514 writes them).
Rdn = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class SubjectPattern:
    text: str
    rdns: tuple[Rdn, ...]       # values are `${name}` templates

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v for rdn in self.rdns for _type, value in rdn for v in variables_in(value)))

    def render(self, variables: Mapping[str, str]) -> tuple[Rdn, ...]:
        """The subject with every variable filled in; ContentError naming the attribute when a
        variable has no value or a value does not fit its attribute."""
        return tuple(tuple((kind, _checked_value(kind, _render(value, variables, kind))) for kind, value in rdn)
                     for rdn in self.rdns)


@dataclass(frozen=True)
class SanRule:
    kind: str                   # one of SAN_KINDS
    pattern: str                # `${name}` template

    @property
    def variables(self) -> tuple[str, ...]:
        return variables_in(self.pattern)

    def render(self, variables: Mapping[str, str]) -> tuple[str, str]:
        value = _render(self.pattern, variables, self.kind)
        check_san(self.kind, value)
        return self.kind, value


def parse_subject_pattern(text: str) -> SubjectPattern:
    """`CN=${person},OU=Staff,O=Example` → its RDNs; ContentError naming what is wrong.

    Commas separate RDNs, `+` the attributes of a multi-valued RDN, a backslash makes the
    next character literal. Attribute types are written out (never a variable); a value holding
    no variable is checked as the certificate would carry it."""
    if not text.strip():
        raise ContentError("a subject pattern names at least one attribute, e.g. 'CN=${holder}'")
    rdns: list[Rdn] = []
    for rdn_text in _split(text, ","):
        attributes = []
        for ava in _split(rdn_text, "+"):
            kind, equals, value = _unescaped_partition(ava)
            kind = kind.strip()
            if not equals:
                raise ContentError(f"{_unescape(ava).strip()!r} is not TYPE=VALUE")
            if kind not in SUBJECT_ATTRIBUTE_BOUNDS:
                raise ContentError(f"unknown subject attribute {kind!r}{did_you_mean(kind, SUBJECT_ATTRIBUTE_NAMES)}; "
                                   f"allowed: {', '.join(SUBJECT_ATTRIBUTE_NAMES)}")
            value = _unescape(value).strip()
            if not value:
                raise ContentError(f"attribute {kind} has no value")
            try:
                names = variables_in(value)
            except ExpressionError as exc:
                raise ContentError(f"attribute {kind}: {exc}") from None
            if not names:
                _checked_value(kind, value)
            attributes.append((kind, value))
        rdns.append(tuple(attributes))
    return SubjectPattern(text, tuple(rdns))


def parse_san_rule(kind: str, pattern: str) -> SanRule:
    if kind not in SAN_KINDS:
        raise ContentError(f"unknown subjectAltName kind {kind!r}{did_you_mean(kind, SAN_KINDS)}; "
                           f"allowed: {', '.join(SAN_KINDS)}")
    try:
        names = variables_in(pattern)
    except ExpressionError as exc:
        raise ContentError(str(exc)) from None
    if not names:
        check_san(kind, pattern)
    return SanRule(kind, pattern)


def check_san(kind: str, value: str) -> None:
    """ContentError when VALUE cannot be a subjectAltName of KIND."""
    if not value:
        raise ContentError(f"{kind}: empty value")
    if len(value) > MAX_SAN_LENGTH:
        raise ContentError(f"{kind}: {len(value)} characters, at most {MAX_SAN_LENGTH}")
    if kind != "upn" and not value.isascii():
        raise ContentError(f"{kind}: {_shown(value)} is not ASCII")
    if kind in ("email", "upn") and not _EMAIL.match(value):
        raise ContentError(f"{kind}: {_shown(value)} is not NAME@DOMAIN")
    if kind == "dns" and not all(_DNS_LABEL.match(label) for label in value.split(".")):
        raise ContentError(f"{kind}: {_shown(value)} is not a host name (letters, digits, '-', dots)")
    if kind == "uri" and (not _URI_SCHEME.match(value) or any(c.isspace() for c in value)):
        raise ContentError(f"{kind}: {_shown(value)} is not a URI (SCHEME:..., no blanks)")


def _render(template: str, variables: Mapping[str, str], where: str) -> str:
    try:
        return render(template, variables)
    except ExpressionError as exc:
        raise ContentError(f"{where}: {exc}") from None


def _checked_value(kind: str, value: str) -> str:
    bound = SUBJECT_ATTRIBUTE_BOUNDS[kind]
    if not value.strip():
        raise ContentError(f"attribute {kind} would be empty")
    # Counted as the encoder counts (UTF-8 bytes): a value of accented or non-Latin letters
    # is refused here, at rendering, not later by the certificate builder.
    size = len(value.encode("utf-8"))
    if size > bound:
        raise ContentError(f"attribute {kind}: {_shown(value)} has {size} bytes in UTF-8, at most {bound}")
    if kind == "C" and not (value.isascii() and value.isalpha()):
        raise ContentError(f"attribute C takes a two-letter country code, not {_shown(value)}")
    return value


def _shown(value: str, limit: int = 80) -> str:
    """A value for an error message: quoted, cut to LIMIT characters (errors never echo unbounded input)."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _split(text: str, separator: str) -> list[str]:
    """TEXT cut at every SEPARATOR that is not escaped (escapes are kept for the next level)."""
    parts, current, i = [], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text):
                raise ContentError("the pattern ends with a lone backslash")
            if text[i + 1] not in _ESCAPABLE:
                raise ContentError(f"'\\{text[i + 1]}' is not an escape; a backslash makes one of "
                                   f"{_ESCAPABLE.strip()} or a blank literal")
            current.append(text[i:i + 2])
            i += 2
            continue
        if char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    if any(not part.strip() for part in parts):
        raise ContentError(f"empty {'RDN' if separator == ',' else 'attribute'} (two {separator!r} in a row, "
                           f"or one at an end)")
    return parts


def _unescaped_partition(text: str) -> tuple[str, str, str]:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "=":
            return text[:i], "=", text[i + 1:]
        i += 1
    return text, "", ""


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)
