"""The content of a certificate a card task asks for, decided here and never by the card's
request (docs/templates.md, "Subject and subjectAltNames"): the template's subject pattern
rendered with the task's variables (or, for a template without one, the task's subject —
the process task's `subject:` or the ProduceCard request's), and its subjectAltName rules.
The CSR contributes its public key and the proof of possession; what else it asks for is
ignored by every CA connector and recorded in the audit by the card task."""
from __future__ import annotations

from collections.abc import Collection, Mapping

from orchestrator.ca.base import IssueProfile, subject_name
from orchestrator.domain.certificate_content import BUILTIN_VARIABLES, ContentError
from orchestrator.domain.templates import CertificateTemplate
from shared.errors import InvalidArgument


def missing_variables(template: CertificateTemplate, given: Collection[str]) -> list[str]:
    """The variables TEMPLATE reads that a task giving GIVEN (plus the built-in ones) lacks."""
    return [v for v in template.content_variables if v not in given and v not in BUILTIN_VARIABLES]


def issue_profile(template: CertificateTemplate, task_subject: str, variables: Mapping[str, str]) -> IssueProfile:
    """The CA profile of one certificate of TEMPLATE: its whole content but the key.
    InvalidArgument naming the template, the field and the problem when a variable has no
    value or renders something a certificate cannot carry."""
    where = f"certificate template {template.name!r} ({template.source}:{{line}})"
    try:
        subject = (subject_name(template.subject.render(variables)) if template.subject is not None
                   else task_subject)
    except ContentError as exc:
        raise InvalidArgument(f"{where.format(line=template.line_of('subject'))}: subject: {exc}",
                              template=template.name, field="subject") from None
    try:
        names = tuple(rule.render(variables) for rule in template.subject_alt_names)
    except ContentError as exc:
        raise InvalidArgument(f"{where.format(line=template.line_of('subject_alt_names'))}: subject_alt_names: {exc}",
                              template=template.name, field="subject_alt_names") from None
    return IssueProfile(validity_days=template.validity_days, subject=subject,
                        key_usage=frozenset(template.key_usage),
                        extended_key_usage=tuple(template.extended_key_usage), subject_alt_names=names)
