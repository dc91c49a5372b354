"""A card's state change, and its certificates following it (docs/lifecycle.md).

A card transition that declares `certificates: {state, reason}` (docs/state-graphs.md) moves
every certificate of the card through its CA first (rule C17: CertificateService.
change_state_in_ca, CA action then store move, audited), then the card. Every certificate
move is checked before the first CA is asked, so a move that cannot be made changes
nothing. A failure or a crash part-way leaves the card in its old state with some
certificates already moved; running the same change again finishes it, because a
certificate already in the target state is left alone (idempotent and resumable). The gap
between one certificate's CA action and its store move is closed as for any C17 change.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.card_certificates import CertificateStep, plan_certificate_moves
from orchestrator.domain.state_graphs import IllegalMove, StateGraph
from orchestrator.domain.templates import Templates
from orchestrator.services.certificates import CertificateService
from orchestrator.store.records import AUDIT_CHANGE_STATE, CardRecord
from shared.errors import ConfigurationError, IllegalTransition
from shared.tls import current_actor

__all__ = ["CardChange", "CardLifeService"]


@dataclass(frozen=True)
class CardChange:
    card: CardRecord
    certificates: tuple[CertificateStep, ...]     # what happened to each certificate of the card

    @property
    def moved(self) -> tuple[CertificateStep, ...]:
        return tuple(s for s in self.certificates if s.skipped is None)


class CardLifeService:
    def __init__(self, store, graphs: dict[str, StateGraph], templates: Templates,
                 certificates: CertificateService) -> None:
        self.store = store
        self.graphs = graphs
        self.templates = templates
        self.certificates = certificates

    def graph_of(self, card: CardRecord) -> StateGraph:
        template = self.templates.card(card.template)
        graph = self.graphs.get(template.state_graph)
        if graph is None:
            raise ConfigurationError(f"card template {template.name!r} names the state graph "
                                     f"{template.state_graph!r}, which is not loaded", template=template.name)
        return graph

    def change_state(self, card_id: str, to_state: str, reason: str | None = None, *,
                     actor: str | None = None) -> CardChange:
        """Moves the card along its graph; its certificates follow as the transition says.
        actor: who the audit names; by default the caller (docs/audit.md)."""
        actor = actor or current_actor()
        card = self.store.cards.get(card_id)
        graph = self.graph_of(card)
        try:
            transition = graph.require_move(card.state, to_state, reason)
        except IllegalMove as exc:
            raise IllegalTransition(f"card {card.id}: {exc}", card_id=card.id, from_state=card.state,
                                    to_state=to_state, graph=graph.name) from None
        steps: list[CertificateStep] = []
        if transition.certificates is not None:
            records = [self.store.certificates.get(i) for i in self.store.cards.certificate_ids(card.id)]
            steps = plan_certificate_moves(transition.certificates,
                                           [(r.id, r.state, self.certificates.graph_of(r)) for r in records],
                                           self.certificates.issued_state)
            for step in steps:
                if step.action is not None:       # C17: the CA acts, then the store moves, audited
                    self.certificates.change_state_in_ca(step.certificate_id, step.to_state, step.reason,
                                                         actor=actor)
        moved = [s.certificate_id for s in steps if s.skipped is None]
        changed = self.store.cards.change_state(
            card.id, to_state, from_state=card.state, actor=actor, action=AUDIT_CHANGE_STATE, reason=reason,
            detail={"graph": graph.name, "certificates_moved": moved,
                    **({"certificates_state": transition.certificates.state} if transition.certificates else {})})
        return CardChange(changed, tuple(steps))
