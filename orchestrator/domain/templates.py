"""Certificate and card templates as plain values.

The embedded defaults below are what the demo and a bare orchestrator use; configuration
files replace them (see docs/).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from shared.cards import KeyType
from shared.errors import TemplateNotFound

DEFAULT_INTERNAL_ISSUED_STATE = "Issued"
DEFAULT_RELATION_TYPE = "HAS_CERTIFICATE"


@dataclass(frozen=True)
class CertificateTemplate:
    name: str
    ca: str
    key_type: KeyType
    validity_days: int
    key_usage: frozenset[str]
    extended_key_usage: tuple[str, ...] = ()
    start_state: str = "Active"
    internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE


@dataclass(frozen=True)
class CardTemplate:
    name: str
    initial_state: str = "InProduction"
    produced_state: str = "Active"
    failed_state: str = "ProductionFailed"


@dataclass
class Templates:
    certificates: dict[str, CertificateTemplate] = field(default_factory=dict)
    cards: dict[str, CardTemplate] = field(default_factory=dict)

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
    return Templates(
        certificates={t.name: t for t in [
            CertificateTemplate("EmployeeAuthentication", ca="local", key_type=KeyType.EC_P256, validity_days=730,
                                key_usage=frozenset({"digitalSignature"}), extended_key_usage=("clientAuth",)),
            CertificateTemplate("EmployeeSignature", ca="local", key_type=KeyType.RSA_2048, validity_days=730,
                                key_usage=frozenset({"digitalSignature", "nonRepudiation"}),
                                extended_key_usage=("emailProtection",)),
        ]},
        cards={"EmployeeCard": CardTemplate("EmployeeCard")},
    )
