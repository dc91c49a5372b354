"""Certificates follow their card: what a card state change does to the card's certificates.

A transition of a card graph may say `certificates: {state: S, reason: R}`: when a card takes
it, every certificate of the card is moved, through its CA (rule C17), to state S of the card
graph's `certificate_graph`, with transition reason R (docs/state-graphs.md). This module
checks those declarations at load time and plans the moves of one card change; running them
(CA first, store after) is orchestrator/services/card_life.py.

Pure domain code: no I/O, no CA, no store.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.domain.ca_actions import CaAction, ca_action_for
from orchestrator.domain.state_graphs import CertificateMove, StateGraph, Transition
from orchestrator.domain.violations import Violation, did_you_mean, suggest
from shared.errors import IllegalTransition, UnmappedCaAction

__all__ = ["CertificateStep", "check_certificate_moves", "plan_certificate_moves"]


def check_certificate_moves(graphs: Mapping[str, StateGraph]) -> list[Violation]:
    """Every violation of the `certificate_graph` / `certificates` declarations of the card
    graphs: an unknown or wrong-kind certificate graph, a target state it does not declare, a
    target no transition of it leads to with the given reason, a move with no CA action."""
    violations: list[Violation] = []
    for graph in graphs.values():
        if graph.kind != "card" or graph.certificate_graph is None:
            continue
        name = graph.certificate_graph
        target_graph = graphs.get(name)
        if target_graph is None or target_graph.kind != "certificate":
            known = sorted(g.name for g in graphs.values() if g.kind == "certificate")
            what = "does not exist" if target_graph is None else "is a card graph"
            violations.append(Violation(graph.source, graph.line, "certificate_graph",
                                        f"certificate graph {name!r} {what} (certificate graphs: "
                                        f"{', '.join(known) or 'none'})", suggest(name, known)))
            continue
        seen: set[tuple[str, CertificateMove]] = set()
        for t in graph.transitions:
            if t.certificates is None or (t.path, t.certificates) in seen:
                continue        # `from: [A, B]` yields one transition per source: report once
            seen.add((t.path, t.certificates))
            violations += _check_move(graph, t, target_graph)
    return violations


def _check_move(card_graph: StateGraph, t: Transition, graph: StateGraph) -> list[Violation]:
    move = t.certificates
    assert move is not None

    def violation(field: str, message: str, suggestion: str | None = None) -> Violation:
        return Violation(card_graph.source, move.line or t.line, f"{t.path}.certificates.{field}", message,
                         suggestion)

    if move.state not in graph.states:
        return [violation("state", f"state {move.state!r} is not declared in the certificate graph "
                          f"{graph.name!r}", suggest(move.state, graph.states))]
    into = [x for x in graph.transitions if x.target == move.state]
    if not into:
        return [violation("state", f"no transition of the certificate graph {graph.name!r} leads to "
                          f"{move.state!r}")]
    accepting = [x for x in into if x.allows(move.reason)]
    if not accepting:
        listing = "; ".join(f"{x.source} → {x.target}" + (f" (reasons {', '.join(x.reasons)})" if x.reasons
                                                          else " (no reason)") for x in into)
        given = f"reason {move.reason!r}" if move.reason else "no reason"
        hint = did_you_mean(move.reason, [r for x in into for r in x.reasons]) if move.reason else ""
        return [violation("reason", f"no transition of the certificate graph {graph.name!r} into "
                          f"{move.state!r} takes {given}: {listing}{hint}")]
    found = []
    for x in accepting:
        try:
            ca_action_for(graph, x.source, move.state, move.reason)
        except UnmappedCaAction:
            found.append(violation("state", f"moving a certificate {x.source} → {move.state} maps to no CA "
                                   f"action (C17); declare `ca_action` on {move.state!r} in {graph.name!r}"))
    return found


@dataclass(frozen=True)
class CertificateStep:
    """One certificate of a card and what the card's change does to it."""
    certificate_id: str
    from_state: str
    to_state: str
    reason: str | None
    action: CaAction | None = None      # None: left alone (see `skipped`)
    skipped: str | None = None          # why it is left alone


def plan_certificate_moves(move: CertificateMove, certificates: Sequence[tuple[str, str, StateGraph]],
                           internal_issued_state: str) -> list[CertificateStep]:
    """The moves of a card change for `certificates` (id, state, its graph), all checked
    before any CA is asked: a certificate already in the target state, in a final state or
    still in the internal issued state (never written, C3) is left alone; any other that
    cannot make the move raises IllegalTransition naming it, and nothing is done."""
    steps = []
    for cert_id, state, graph in certificates:
        skipped = None
        if state == move.state:
            skipped = f"already {state}"
        elif state == internal_issued_state:
            skipped = f"in the internal issued state {state!r}: never written to the card (C3, C5)"
        elif state in graph.states and graph.states[state].final:
            skipped = f"in the final state {state!r}"
        elif move.state not in graph.states or not graph.can_move(state, move.state, move.reason):
            raise IllegalTransition(
                f"certificate {cert_id} ({state}, state graph {graph.name!r}) cannot follow its card to "
                f"{move.state!r}" + (f" with reason {move.reason!r}" if move.reason else "")
                + "; nothing was changed", certificate_id=cert_id, from_state=state, to_state=move.state,
                graph=graph.name)
        if skipped is not None:
            steps.append(CertificateStep(cert_id, state, move.state, move.reason, skipped=skipped))
        else:
            steps.append(CertificateStep(cert_id, state, move.state, move.reason,
                                         ca_action_for(graph, state, move.state, move.reason)))
    return steps
