"""Encoding descriptions: the INI script of what to put on a card (docs/encoding-descriptions.md).

``parse_encoding`` turns the text into a frozen ``EncodingDescription`` or raises
``EncodingError`` listing *every* violation, each with file, line, the keyword it is about
and, where one is close, a "did you mean". ``check_field_mapping`` checks a task's field
mapping against a parsed description (rule C13). The reference for every keyword is
docs/encoding-descriptions.md.

Why a hand-written reader: configparser forgets line numbers, lower-cases keys (keywords
here are case-sensitive, as in the founding document) and treats ``;`` as an inline comment
marker in some modes, which would cut APDU scripts (``...9000;00B0...``) in half. The
format is small enough to read line by line:

* ``[Section]`` headers, ``key=value`` lines (spaces around key and value are ignored);
* whole-line comments starting with ``#`` or ``;``, and blank lines;
* no inline comments (a value may contain ``;`` and ``#``), no continuation lines;
* a section or key given twice is an error, not a silent override.

The model never holds PIN or PUK values, only the names of the fields that will carry them.
"""
from __future__ import annotations

import enum
import re
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.domain.processes.expressions import variable_of
from orchestrator.domain.violations import Violation, did_you_mean
from shared.cards import Apdu, KeyType, check_command_apdu

ENCODING_TYPES = ("Chip",)
APPLICATION_PREFIX = "Application_"

# Keywords per section, spelled exactly as operators write them (case-sensitive).
ENCODING_KEYWORDS = ("Type",)
DESCRIPTION_KEYWORDS = ("SetPIN", "PIN", "InitialPUK", "NewPIN")
APPLICATION_KEYWORDS = (
    "GenerateKeyPair", "CertificateTemplate", "KeyLabel", "revokeOnIssue",
    "CreateObjectRelation", "ObjectRelationType", "CertCoreObjectDescriptorReturnField",
    "ArchiveKey", "RecoverCertificate", "WriteCertificate", "Certificate",
    "WriteCertKeyList", "CertKeyList", "DataObject", "LabelExpressionDataObject",
    "AttributesDataObject", "ApduScript", "DeleteObjects",
)
_SECTION_KEYWORDS = {"Encoding": ENCODING_KEYWORDS, "Description": DESCRIPTION_KEYWORDS,
                     "Application": APPLICATION_KEYWORDS}

_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_APPLICATION_SUFFIX = re.compile(r"[A-Za-z0-9_]+\Z")
_SW_PATTERN = re.compile(r"[0-9A-FX]{4}\Z")
_HEX = re.compile(r"[0-9A-Fa-f]*\Z")


# -- violations ------------------------------------------------------------------------

class EncodingError(ValueError):
    """An encoding description (or a field mapping) was rejected; ``violations`` lists all."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = list(violations)
        super().__init__("\n".join(str(v) for v in self.violations))


# -- the model -------------------------------------------------------------------------

class CreateObjectRelation(enum.Enum):
    """Rules C9–C11: when the card→certificate relation is created."""
    ALWAYS = "always"      # C9: even if the encoding fails
    SUCCESS = "success"    # C10, the default: only if the whole task succeeds
    NEVER = "never"        # C11


@dataclass(frozen=True)
class FieldDecl:
    name: str
    line: int


@dataclass(frozen=True)
class DescriptionSection:
    """The card-wide ``[Description]``: PIN handling. Holds field *names*, never values."""
    set_pin: bool = False
    pin_field: str | None = None
    initial_puk_field: str | None = None
    line: int = 0                       # 0: the section is absent
    # With SetPIN=true: the holder changes the PIN; PIN is then the current PIN, NewPIN the new one.
    new_pin_field: str | None = None


@dataclass(frozen=True)
class Application:
    """One ``[Application_X]`` section; the orchestrator runs them in ``order_key`` order."""
    name: str                           # "Application_A"
    suffix: str                         # "A"
    line: int                           # line of the section header
    generate_key_pair: KeyType | None = None
    certificate_template: str | None = None
    key_label: str | None = None
    revoke_on_issue: bool = False
    create_object_relation: CreateObjectRelation = CreateObjectRelation.SUCCESS
    object_relation_type: str | None = None      # None: the configured default (C12)
    return_field: str | None = None              # CertCoreObjectDescriptorReturnField (C13)
    archive_key: bool = False
    recover_certificate_field: str | None = None
    write_certificate: bool = False
    certificate_field: str | None = None
    write_cert_key_list: bool = False
    cert_key_list_field: str | None = None
    data_object: str | None = None               # raw definitions, interpreted at encoding time
    label_expression_data_object: str | None = None
    attributes_data_object: str | None = None
    apdu_script_field: str | None = None         # ApduScript=FIELD: the script comes at run time
    apdus: tuple[Apdu, ...] = ()                 # ApduScript=<inline hex>, already validated
    delete_objects: bool = False                 # DeleteObjects=true: erase the card's keys and certificates first
    # keyword -> line, for errors found later (process loading, encoding time)
    keyword_lines: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_recovery(self) -> bool:
        return self.recover_certificate_field is not None

    @property
    def issues_certificate(self) -> bool:
        """True when the orchestrator requests a new certificate from a CA (C1–C3, C6, C13)."""
        return self.certificate_template is not None and not self.is_recovery

    @property
    def puts_certificate_on_card(self) -> bool:
        """True when a certificate ends up on the card, so a relation (C9–C12) can be made."""
        return (self.issues_certificate or self.is_recovery or self.write_certificate
                or self.write_cert_key_list)

    def line_of(self, keyword: str) -> int:
        """Line of ``keyword`` in this section, or of the section header when it is absent."""
        return self.keyword_lines.get(keyword, self.line)


@dataclass(frozen=True)
class EncodingDescription:
    source: str
    encoding_type: str
    fields: tuple[FieldDecl, ...]
    description: DescriptionSection
    applications: tuple[Application, ...]        # already in run order
    warnings: tuple[Violation, ...] = ()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def return_fields(self) -> tuple[str, ...]:
        """Fields that receive a CoreObjectDescriptor (C13). Recovery sets none (C7)."""
        return tuple(a.return_field for a in self.applications
                     if a.return_field is not None and not a.is_recovery)

    def input_fields(self) -> tuple[str, ...]:
        """Fields whose value the task must supply, in order of first use, no repeats."""
        d = self.description
        names = [d.pin_field, d.new_pin_field, d.initial_puk_field]
        for a in self.applications:
            names += [a.recover_certificate_field, a.certificate_field, a.cert_key_list_field,
                      a.apdu_script_field]
        return tuple(dict.fromkeys(n for n in names if n is not None))


def application_order_key(suffix: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order of application suffixes: A < B < … < Z, 2 < 10, digits before letters.

    Runs of digits compare as numbers, letters compare case-insensitively, and the exact
    spelling breaks ties so the order is total (Application_a and Application_A both run,
    in a fixed order).
    """
    parts = re.findall(r"\d+|\D+", suffix)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.casefold()) for p in parts)
    return (*key, (2, 0, suffix))


# -- APDU scripts ----------------------------------------------------------------------

def parse_apdu_script(text: str) -> tuple[Apdu, ...]:
    """``HEX[/SW[,SW…]]`` commands separated by ``;``; raises ValueError naming every problem.

    Spaces inside the hex are allowed (``00 A4 04 00``); an SW pattern is 4 hex digits with
    ``X`` for any digit (``61XX``); without a pattern a command must answer ``9000``.
    A trailing ``;`` is allowed. Used for inline scripts at load time and for scripts that
    arrive in a field at run time.
    """
    problems: list[str] = []
    apdus: list[Apdu] = []
    commands = text.split(";")
    if commands and not commands[-1].strip():
        commands.pop()                                 # trailing ";"
    if not commands:
        raise ValueError("empty APDU script")
    for number, command in enumerate(commands, start=1):
        hex_part, slash, sw_part = command.partition("/")
        hex_text = "".join(hex_part.split())
        if not hex_text:
            problems.append(f"command {number} is empty")
            continue
        if not _HEX.match(hex_text) or len(hex_text) % 2:
            problems.append(f"command {number} {hex_text[:40]!r} is not an even number of hex digits")
            continue
        why = check_command_apdu(bytes.fromhex(hex_text))
        if why:
            problems.append(f"command {number} {hex_text[:40]!r}: {why}")
            continue
        patterns = tuple(p.strip().upper() for p in sw_part.split(",")) if slash else ("9000",)
        bad = [p for p in patterns if not _SW_PATTERN.match(p)]
        if bad:
            problems.append(f"command {number}: status word pattern {bad[0]!r} is not 4 hex digits"
                            " (X = any digit)")
            continue
        apdus.append(Apdu(bytes.fromhex(hex_text), patterns))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(apdus)


# -- the line reader -------------------------------------------------------------------

@dataclass
class _Entry:
    key: str
    value: str
    line: int


@dataclass
class _Section:
    name: str
    line: int
    entries: list[_Entry] = field(default_factory=list)


def _read_ini(text: str, source: str, errors: list[Violation]) -> list[_Section]:
    """Sections in file order. Syntax errors and duplicates go to ``errors``."""
    sections: list[_Section] = []
    seen: dict[str, int] = {}
    current: _Section | None = None
    skipping = False                                   # inside a duplicate section
    # Lines are what an editor shows: split on "\n" only ("\r\n" files work too).
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                errors.append(Violation(source, number, "", f"malformed section header {line[:60]!r};"
                                        " expected [Name]"))
                current, skipping = None, True
                continue
            name = line[1:-1].strip()
            if name in seen:
                errors.append(Violation(source, number, name,
                                        f"section [{name}] appears twice (first at line {seen[name]})"))
                current, skipping = None, True
                continue
            seen[name] = number
            current, skipping = _Section(name, number), False
            sections.append(current)
            continue
        key, eq, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if skipping:
            continue
        if not eq:
            errors.append(Violation(source, number, current.name if current else "",
                                    f"expected key=value, got {line[:60]!r}"))
            continue
        if not key:
            errors.append(Violation(source, number, current.name if current else "",
                                    "missing keyword before '='"))
            continue
        if current is None:
            errors.append(Violation(source, number, key, "keyword outside any section;"
                                    " put it under a [Section] header"))
            continue
        first = next((e for e in current.entries if e.key == key), None)
        if first is not None:
            errors.append(Violation(source, number, f"{current.name}.{key}",
                                    f"{key} given twice in [{current.name}] (first at line {first.line})"))
            continue
        current.entries.append(_Entry(key, value, number))
    return sections


# -- interpretation --------------------------------------------------------------------

class _Parser:
    def __init__(self, source: str, known_templates: Collection[str] | None) -> None:
        self.source = source
        self.known_templates = None if known_templates is None else sorted(known_templates)
        self.errors: list[Violation] = []
        self.warnings: list[Violation] = []
        self.fields: dict[str, FieldDecl] = {}

    def error(self, line: int, path: str, message: str) -> None:
        self.errors.append(Violation(self.source, line, path, message))

    def warn(self, line: int, path: str, message: str) -> None:
        self.warnings.append(Violation(self.source, line, path, message))

    # values ---------------------------------------------------------------------------

    def _bool(self, e: _Entry, path: str) -> bool:
        # Booleans accept any case (True, TRUE): operators write them all ways, and there is
        # no doubt what they mean. Keywords and enumerated values stay case-sensitive.
        if e.value.lower() in ("true", "false"):
            return e.value.lower() == "true"
        self.error(e.line, path, f"expected true or false, got {e.value!r}")
        return False

    def _choice(self, e: _Entry, path: str, allowed: Collection[str], what: str) -> str | None:
        if e.value in allowed:
            return e.value
        self.error(e.line, path, f"unknown {what} {e.value!r}{did_you_mean(e.value, allowed)};"
                   f" allowed: {', '.join(allowed)}")
        return None

    def _field_ref(self, e: _Entry, path: str) -> str | None:
        """A value naming a field: it must be declared in [Fields]."""
        if e.value in self.fields:
            return e.value
        hint = did_you_mean(e.value, self.fields) or (
            "" if self.fields else " ([Fields] declares no fields)")
        self.error(e.line, path, f"field {e.value!r} is not declared in [Fields]{hint}")
        return None

    def _keywords(self, section: _Section, kind: str) -> dict[str, _Entry]:
        """The section's entries by keyword; unknown keywords reported with a suggestion."""
        allowed = _SECTION_KEYWORDS[kind]
        known: dict[str, _Entry] = {}
        for e in section.entries:
            path = f"{section.name}.{e.key}"
            if e.key in allowed:
                if e.value:
                    known[e.key] = e
                else:
                    self.error(e.line, path, f"{e.key} needs a value; leave the keyword out for the default")
                continue
            elsewhere = [s for s, words in _SECTION_KEYWORDS.items() if e.key in words]
            if elsewhere:
                where = "an [Application_X]" if elsewhere[0] == "Application" else f"[{elsewhere[0]}]"
                hint = f" ({e.key} belongs in {where} section)"
            else:
                hint = did_you_mean(e.key, allowed) or f" (known: {', '.join(allowed)})"
            self.error(e.line, path, f"unknown keyword {e.key!r} in [{section.name}]{hint}")
        return known

    # sections -------------------------------------------------------------------------

    def encoding(self, section: _Section | None, misspelled: bool) -> str:
        if section is None:
            if not misspelled:                         # else "unknown section" said it already
                self.error(1, "Encoding", "missing [Encoding] section (add [Encoding] with Type=Chip)")
            return ""
        kw = self._keywords(section, "Encoding")
        if "Type" not in kw:
            if not any(e.key == "Type" for e in section.entries):   # empty value reported already
                self.error(section.line, "Encoding.Type", "missing Type (cardline encodes Type=Chip)")
            return ""
        return self._choice(kw["Type"], "Encoding.Type", ENCODING_TYPES, "encoding type") or ""

    def fields_section(self, section: _Section | None) -> None:
        if section is None:
            return
        for e in section.entries:
            path = f"Fields.{e.key}"
            if not _FIELD_NAME.match(e.key):
                self.error(e.line, path, f"invalid field name {e.key!r}: use letters, digits and _,"
                           " not starting with a digit")
                continue
            if e.value:
                self.error(e.line, path, "a field declaration takes no value (write "
                           f"'{e.key}='); values come from the task's field mapping")
            self.fields[e.key] = FieldDecl(e.key, e.line)

    def description(self, section: _Section | None) -> DescriptionSection:
        if section is None:
            return DescriptionSection()
        kw = self._keywords(section, "Description")
        set_pin = self._bool(kw["SetPIN"], "Description.SetPIN") if "SetPIN" in kw else False
        pin = self._field_ref(kw["PIN"], "Description.PIN") if "PIN" in kw else None
        puk = self._field_ref(kw["InitialPUK"], "Description.InitialPUK") if "InitialPUK" in kw else None
        new_pin = self._field_ref(kw["NewPIN"], "Description.NewPIN") if "NewPIN" in kw else None
        if set_pin and "PIN" not in kw:
            self.error(kw["SetPIN"].line, "Description.SetPIN",
                       "SetPIN=true needs PIN=<field> naming the field that carries the new PIN")
        if new_pin is not None and not set_pin:
            self.error(kw["NewPIN"].line, "Description.NewPIN", "NewPIN needs SetPIN=true (a PIN change)")
        if new_pin is not None and puk is not None:
            self.error(kw["NewPIN"].line, "Description.NewPIN",
                       "NewPIN (the holder changes the PIN) cannot be combined with InitialPUK")
        return DescriptionSection(set_pin, pin, puk, section.line, new_pin)

    def application(self, section: _Section) -> Application:
        name, line = section.name, section.line
        kw = self._keywords(section, "Application")
        def p(keyword: str) -> str:
            return f"{name}.{keyword}"
        v: dict[str, Any] = {}

        if "GenerateKeyPair" in kw:
            choice = self._choice(kw["GenerateKeyPair"], p("GenerateKeyPair"),
                                  [k.value for k in KeyType], "key type")
            v["generate_key_pair"] = KeyType(choice) if choice else None
        if "CertificateTemplate" in kw:
            e = kw["CertificateTemplate"]
            v["certificate_template"] = e.value
            if self.known_templates is not None and e.value not in self.known_templates:
                hint = did_you_mean(e.value, self.known_templates)
                known = "" if hint else f" (known: {', '.join(self.known_templates) or 'none'})"
                self.error(e.line, p("CertificateTemplate"),
                           f"unknown certificate template {e.value!r}{hint}{known}")
        for key, attr in (("KeyLabel", "key_label"), ("ObjectRelationType", "object_relation_type"),
                          ("DataObject", "data_object"),
                          ("LabelExpressionDataObject", "label_expression_data_object"),
                          ("AttributesDataObject", "attributes_data_object")):
            if key in kw:
                v[attr] = kw[key].value
        for key, attr in (("revokeOnIssue", "revoke_on_issue"), ("ArchiveKey", "archive_key"),
                          ("WriteCertificate", "write_certificate"),
                          ("WriteCertKeyList", "write_cert_key_list"), ("DeleteObjects", "delete_objects")):
            if key in kw:
                v[attr] = self._bool(kw[key], p(key))
        if "CreateObjectRelation" in kw:
            choice = self._choice(kw["CreateObjectRelation"], p("CreateObjectRelation"),
                                  [c.value for c in CreateObjectRelation], "value")
            if choice:
                v["create_object_relation"] = CreateObjectRelation(choice)
        for key, attr in (("CertCoreObjectDescriptorReturnField", "return_field"),
                          ("RecoverCertificate", "recover_certificate_field"),
                          ("Certificate", "certificate_field"),
                          ("CertKeyList", "cert_key_list_field")):
            if key in kw:
                v[attr] = self._field_ref(kw[key], p(key))
        if "ApduScript" in kw:
            self._apdu_script(kw["ApduScript"], p("ApduScript"), v)

        app = Application(name=name, suffix=name[len(APPLICATION_PREFIX):], line=line,
                          keyword_lines=types.MappingProxyType({k: e.line for k, e in kw.items()}), **v)
        self._check_combination(app, kw, {e.key for e in section.entries})
        return app

    def _apdu_script(self, e: _Entry, path: str, v: dict[str, Any]) -> None:
        # A value that is a declared field, or that cannot be hex (it has letters past F or
        # an underscore), names a field; anything else is an inline script.
        if e.value in self.fields:
            v["apdu_script_field"] = e.value
            return
        looks_like_hex = re.fullmatch(r"[0-9A-Fa-f\s;/,Xx]*", e.value) is not None
        if _FIELD_NAME.match(e.value) and not looks_like_hex:
            self._field_ref(e, path)                   # reports the undeclared field
            return
        try:
            v["apdus"] = parse_apdu_script(e.value)
        except ValueError as exc:
            self.error(e.line, path, f"invalid APDU script: {exc}")

    def _check_combination(self, a: Application, kw: Mapping[str, _Entry], written: set[str]) -> None:
        """Keywords that contradict each other, are missing a partner, or have no effect."""
        def p(keyword: str) -> str:
            return f"{a.name}.{keyword}"
        has = kw.__contains__

        if a.archive_key and has("GenerateKeyPair"):
            self.error(kw["ArchiveKey"].line, p("ArchiveKey"),
                       "ArchiveKey=true generates the key in the orchestrator (to archive it);"
                       " it cannot be combined with GenerateKeyPair, which generates it on the card")
        if a.archive_key and not has("CertificateTemplate"):
            self.error(kw["ArchiveKey"].line, p("ArchiveKey"),
                       "ArchiveKey=true needs CertificateTemplate=<template> (the key is archived"
                       " for an encryption certificate)")
        if has("CertificateTemplate") and not has("GenerateKeyPair") and not a.archive_key \
                and not has("RecoverCertificate"):
            self.error(kw["CertificateTemplate"].line, p("CertificateTemplate"),
                       "a certificate needs a key: add GenerateKeyPair=<key type> (on the card)"
                       " or ArchiveKey=true (in the orchestrator, archived)")
        if has("RecoverCertificate"):
            clash = [k for k in ("GenerateKeyPair", "CertificateTemplate", "ArchiveKey") if has(k)]
            if clash:
                self.error(kw["RecoverCertificate"].line, p("RecoverCertificate"),
                           "RecoverCertificate writes an archived certificate and key; it cannot be"
                           f" combined with {', '.join(clash)} (use a separate application)")
            if has("CertCoreObjectDescriptorReturnField"):
                # C7: a warning, not an error: the keyword is harmless, just ignored, and
                # operators copy applications between issuance and recovery descriptions.
                self.warn(kw["CertCoreObjectDescriptorReturnField"].line,
                          p("CertCoreObjectDescriptorReturnField"),
                          "has no effect on a recovery (C7): a recovered certificate is not issued,"
                          " so no CoreObjectDescriptor is returned")
            if a.revoke_on_issue:
                self.warn(kw["revokeOnIssue"].line, p("revokeOnIssue"),
                          "has no effect on a recovery (C7): the recovered certificate is not issued")
        elif not has("CertificateTemplate"):
            for key in ("CertCoreObjectDescriptorReturnField", "revokeOnIssue"):
                if has(key) and (key != "revokeOnIssue" or a.revoke_on_issue):
                    self.warn(kw[key].line, p(key), "has no effect: this application requests no"
                              " certificate (no CertificateTemplate)")
        if a.write_certificate and not has("Certificate"):
            self.error(kw["WriteCertificate"].line, p("WriteCertificate"),
                       "WriteCertificate=true needs Certificate=<field> naming the certificate to write")
        if has("Certificate") and not a.write_certificate:
            self.warn(kw["Certificate"].line, p("Certificate"),
                      "has no effect without WriteCertificate=true")
        if a.write_cert_key_list and not has("CertKeyList"):
            self.error(kw["WriteCertKeyList"].line, p("WriteCertKeyList"),
                       "WriteCertKeyList=true needs CertKeyList=<field> naming the list to write")
        if has("CertKeyList") and not a.write_cert_key_list:
            self.warn(kw["CertKeyList"].line, p("CertKeyList"),
                      "has no effect without WriteCertKeyList=true")
        if has("KeyLabel") and not (has("GenerateKeyPair") or a.archive_key or has("RecoverCertificate")):
            self.warn(kw["KeyLabel"].line, p("KeyLabel"), "has no effect: this application puts no key"
                      " on the card")
        # Judge the relation keywords on the keywords present, not on the parsed values: a
        # value already reported as wrong must not also make them look useless.
        puts_certificate = (has("CertificateTemplate") or has("RecoverCertificate")
                            or has("WriteCertificate") or has("WriteCertKeyList"))
        if not puts_certificate:
            for key in ("CreateObjectRelation", "ObjectRelationType"):
                if has(key):
                    self.warn(kw[key].line, p(key), "has no effect: this application puts no"
                              " certificate on the card")
        elif has("ObjectRelationType") and a.create_object_relation is CreateObjectRelation.NEVER:
            self.warn(kw["ObjectRelationType"].line, p("ObjectRelationType"),
                      "has no effect with CreateObjectRelation=never")

        # "Does nothing" only when every keyword written is known and none asks for work:
        # an empty or misspelled keyword has been reported already, once is enough.
        does_something = bool(written & {
            "GenerateKeyPair", "CertificateTemplate", "ArchiveKey", "RecoverCertificate",
            "WriteCertificate", "WriteCertKeyList", "DataObject", "LabelExpressionDataObject",
            "AttributesDataObject", "ApduScript", "DeleteObjects"})
        if not does_something and written <= set(APPLICATION_KEYWORDS):
            self.error(a.line, a.name, "the application does nothing: give it GenerateKeyPair,"
                       " CertificateTemplate, ArchiveKey, RecoverCertificate, WriteCertificate,"
                       " WriteCertKeyList, a data object, an ApduScript or DeleteObjects")


def parse_encoding(text: str, source: str,
                   known_certificate_templates: Collection[str] | None = None) -> EncodingDescription:
    """Parse an encoding description; raise EncodingError listing every violation.

    ``source`` names the file in messages. ``known_certificate_templates``: the names a
    ``CertificateTemplate`` may use; None skips that check (e.g. a syntax check without
    configuration). Warnings (keywords without effect) are on the result's ``warnings``.
    """
    parser = _Parser(source, known_certificate_templates)
    sections = _read_ini(text, source, parser.errors)
    by_name = {s.name: s for s in sections}

    applications: list[_Section] = []
    for s in sections:
        if s.name in ("Encoding", "Fields", "Description"):
            continue
        suffix = s.name[len(APPLICATION_PREFIX):]
        if s.name.startswith(APPLICATION_PREFIX) and _APPLICATION_SUFFIX.match(suffix):
            applications.append(s)
            continue
        candidates = ["Encoding", "Fields", "Description"]
        tail = re.split(r"[_\s]", s.name, maxsplit=1)
        if len(tail) == 2 and tail[1].strip():
            candidates.append(APPLICATION_PREFIX + tail[1].strip())
        hint = did_you_mean(s.name, candidates) or " (sections: Encoding, Fields, Description, Application_<X>)"
        parser.error(s.line, s.name, f"unknown section [{s.name}]{hint}")

    encoding_type = parser.encoding(by_name.get("Encoding"),
                                    misspelled=any(n.casefold() == "encoding" for n in by_name))
    parser.fields_section(by_name.get("Fields"))              # before anything refers to fields
    description = parser.description(by_name.get("Description"))
    applications.sort(key=lambda s: application_order_key(s.name[len(APPLICATION_PREFIX):]))
    apps = tuple(parser.application(s) for s in applications)
    returned_by: dict[str, Application] = {}
    for a in apps:
        if a.return_field is None or a.is_recovery:
            continue
        if a.return_field in returned_by:          # C13: one field holds one descriptor
            parser.error(a.line_of("CertCoreObjectDescriptorReturnField"),
                         f"{a.name}.CertCoreObjectDescriptorReturnField",
                         f"field {a.return_field!r} already receives the certificate of"
                         f" {returned_by[a.return_field].name}; one of the two would be lost")
        returned_by[a.return_field] = a
    if not apps and not description.set_pin and "Encoding" in by_name:
        parser.error(by_name["Encoding"].line, "Encoding", "the encoding does nothing: add an"
                     " [Application_X] section or SetPIN=true in [Description]")

    if parser.errors:
        raise EncodingError(sorted(parser.errors, key=lambda v: v.line))
    return EncodingDescription(source=source, encoding_type=encoding_type,
                               fields=tuple(parser.fields.values()), description=description,
                               applications=apps,
                               warnings=tuple(sorted(parser.warnings, key=lambda v: v.line)))


def load_encoding(path: str | Path,
                  known_certificate_templates: Collection[str] | None = None) -> EncodingDescription:
    """``parse_encoding`` on a UTF-8 file, named in messages as given."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = Violation(str(path), 1, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}")
        raise EncodingError([problem]) from None
    return parse_encoding(text, str(path), known_certificate_templates)


# -- field mapping (C13) ---------------------------------------------------------------

def process_variable_of(expr: str) -> str | None:
    """``name`` when ``expr`` is exactly ``${name}`` (name an identifier), else None."""
    return variable_of(expr)


def check_field_mapping(encoding: EncodingDescription, mapping: Mapping[str, str], source: str,
                        line_of: Callable[[str], int] | None = None) -> list[Violation]:
    """Violations of a task's field mapping (``{field: literal or "${variable}"}``).

    * every return field (C13) is mapped to exactly ``${name}``, one variable per field;
    * every input field (PIN, InitialPUK, Certificate, ...) is mapped to a non-empty value;
    * every mapped field is declared in the encoding's [Fields] (catches typos).

    ``source`` and ``line_of(field_name)`` locate the mapping (the process file); without
    ``line_of`` violations carry line 0 (unknown).
    """
    where = line_of or (lambda _name: 0)
    found: list[Violation] = []
    def fail(name: str, message: str) -> None:
        found.append(Violation(source, where(name), f"fields.{name}", message))

    declared = encoding.field_names
    for name in mapping:
        if name not in declared:
            fail(name, f"field {name!r} is not declared in [Fields] of {encoding.source}"
                       f"{did_you_mean(name, declared)}")

    written_by: dict[str, str] = {}
    for name in encoding.return_fields():
        if name not in mapping:
            fail(name, f"return field {name!r} (CertCoreObjectDescriptorReturnField) is not mapped;"
                       f" map it to a process variable, e.g. {name}: \"${{{name[:1].lower() + name[1:]}}}\"")
            continue
        expr = mapping[name]
        variable = process_variable_of(expr)
        if variable is None:
            hint = ""
            bare = re.fullmatch(r"\$?\{?\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}?", str(expr).strip())
            if bare:
                hint = f" (did you mean '${{{bare.group(1)}}}'?)"
            fail(name, f"return field {name!r} must be mapped to a process variable written"
                       f" ${{name}}, not {expr!r}{hint}")
        elif variable in written_by:
            fail(name, f"return fields {written_by[variable]!r} and {name!r} both write process"
                       f" variable {variable!r}; one CoreObjectDescriptor would be lost")
        else:
            written_by[variable] = name

    for name in encoding.input_fields():
        if name not in mapping:
            fail(name, f"field {name!r} is used by the encoding but not mapped; give it a value or"
                       " a process variable (${name})")
        elif not str(mapping[name]).strip():
            fail(name, f"field {name!r} is mapped to an empty value")
    return found
