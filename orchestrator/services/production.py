"""A card production asked for directly (ProduceCard, `cardline produce`) rather than by a
process: the certificates requested become an encoding description built in code, and the
card task engine runs it like any other."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.encoding import Application, DescriptionSection, EncodingDescription, FieldDecl
from orchestrator.domain.templates import Templates
from orchestrator.services.card_tasks import PRODUCTION, CardTaskOrder
from orchestrator.services.pool import ReaderSelector
from shared import cards
from shared.errors import InvalidArgument

PIN_FIELD = "USER_PIN"


@dataclass(frozen=True)
class CertificateOrder:
    template: str
    key_type: cards.KeyType | None = None   # None: the template's key type
    key_label: str = ""


def production_order(templates: Templates, selector: ReaderSelector, subject: str,
                     certificates: tuple[CertificateOrder, ...], user_pin: str, *,
                     card_template: str) -> CardTaskOrder:
    if not card_template:
        known = ", ".join(sorted(templates.cards)) or "none"
        raise InvalidArgument(f"the order names no card template (configured: {known})", field="card_template")
    card = templates.card(card_template)              # unknown template: refused before a task exists
    if not certificates:
        raise InvalidArgument("the order asks for no certificate", field="certificates")
    for wanted in certificates:
        templates.certificate(wanted.template)          # unknown template: refused before a task exists
    applications = tuple(
        Application(name=f"Application_{i + 1}", suffix=str(i + 1), line=0, generate_key_pair=wanted.key_type,
                    certificate_template=wanted.template, key_label=wanted.key_label or None)
        for i, wanted in enumerate(certificates))
    encoding = EncodingDescription(source="<ProduceCard request>", encoding_type="Chip",
                                   fields=(FieldDecl(PIN_FIELD, 0),),
                                   description=DescriptionSection(pin_field=PIN_FIELD), applications=applications)
    return CardTaskOrder(PRODUCTION, card, encoding, selector, subject,
                         fields={PIN_FIELD: user_pin})
