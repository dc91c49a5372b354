"""Rules C14/C15: the internal issued state, checked before the orchestrator starts.

A certificate received from a CA is stored in the internal issued state (C1) and moved to
its graph's start state when the task succeeds (C2). For that the state must exist in every
certificate state graph with a transition to the start state (C15, also for the default
name), every certificate template must name it, and it must serve no other purpose — else
"still in the issued state" would no longer mean "issued by a task that did not finish".

Pure domain code: the configuration value and the templates are handed in.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.state_graphs import (
    DEFAULT_INTERNAL_ISSUED_STATE,
    StateGraph,
    StateGraphError,
    Violation,
    suggest,
)

__all__ = [
    "DEFAULT_INTERNAL_ISSUED_STATE",
    "INTERNAL_ISSUED_STATE_KEY",
    "TemplateRef",
    "check_internal_issued_state",
    "require_internal_issued_state",
]

#: The configuration key of the founding document (config file, and environment in docker-compose).
INTERNAL_ISSUED_STATE_KEY = "stateGraphDefinitionManager.certificateInternalIssuedState"


@dataclass(frozen=True)
class TemplateRef:
    """The part of a certificate template these rules look at (templates are loaded elsewhere)."""

    name: str
    source: str  # file the template comes from
    line: int
    state_graph: str
    internal_issued_state: str | None  # None when the template does not configure it


def check_internal_issued_state(issued_state: str, graphs: dict[str, StateGraph],
                                certificate_templates: list[TemplateRef]) -> list[Violation]:
    """Every violation of C14/C15, in file order; empty when all is well.

    Card state graphs are not concerned: only certificates pass through the issued state.
    """
    if not issued_state or not issued_state.strip():
        return [Violation("configuration", 1, INTERNAL_ISSUED_STATE_KEY,
                          "the internal issued state must be a non-empty state name")]
    violations: list[Violation] = []
    for graph in sorted(graphs.values(), key=lambda g: (g.source, g.line, g.name)):
        if graph.kind == "certificate":
            violations += _check_graph(issued_state, graph)
    for template in certificate_templates:
        violations += _check_template(issued_state, template, graphs)
    return violations


def require_internal_issued_state(issued_state: str, graphs: dict[str, StateGraph],
                                  certificate_templates: list[TemplateRef]) -> None:
    """Start-up guard: raises StateGraphError listing every C14/C15 violation."""
    violations = check_internal_issued_state(issued_state, graphs, certificate_templates)
    if violations:
        raise StateGraphError(violations)


def _check_graph(issued: str, graph: StateGraph) -> list[Violation]:
    found: list[Violation] = []

    def report(line: int, path: str, message: str, suggestion: str | None = None) -> None:
        found.append(Violation(graph.source, max(line, 1), path,
                               f"certificate state graph {graph.name!r}: {message}", suggestion))

    if issued not in graph.states:
        report(graph.line, "states", f"lacks the internal issued state {issued!r} "
               f"({INTERNAL_ISSUED_STATE_KEY}) and its transition to the start state {graph.start!r}",
               suggest(issued, graph.states))
        return found

    state = graph.states[issued]
    if graph.start == issued:
        report(state.line, "start", f"the internal issued state {issued!r} must not be the start state")
    elif graph.transition(issued, graph.start) is None:  # C15
        report(state.line, f"states.{issued}",
               f"needs a transition from the internal issued state {issued!r} to the start state {graph.start!r}")
    for t in graph.transitions:
        if t.target == issued:
            report(t.line, f"{t.path}.to", f"the internal issued state {issued!r} must not be reachable from "
                   f"another state (transition {t.source} → {t.target})")
        elif t.source == issued and t.target != graph.start:
            report(t.line, f"{t.path}.to", f"the internal issued state {issued!r} may only lead to the start "
                   f"state {graph.start!r} (transition {t.source} → {t.target})")
        elif t.source == issued and t.reasons:
            # C2 moves the certificate without a reason; a required reason would block it.
            report(t.line, f"{t.path}.reasons", f"the transition {issued} → {graph.start} must not require "
                   "a reason (it is taken automatically when the task succeeds)")
    if state.ca_action is not None:
        report(state.line, f"states.{issued}.ca_action", f"the internal issued state {issued!r} must not imply "
               f"a CA action (found {state.ca_action!r})")
    return found


def _check_template(issued: str, template: TemplateRef, graphs: dict[str, StateGraph]) -> list[Violation]:
    found: list[Violation] = []

    def report(path: str, message: str, suggestion: str | None = None) -> None:
        found.append(Violation(template.source, max(template.line, 1), path,
                               f"certificate template {template.name!r}: {message}", suggestion))

    if not template.internal_issued_state:
        report("internal_issued_state", f"does not configure the internal issued state; it must be {issued!r} "
               f"({INTERNAL_ISSUED_STATE_KEY})")
    elif template.internal_issued_state != issued:
        report("internal_issued_state", f"configures the internal issued state "
               f"{template.internal_issued_state!r}, but {INTERNAL_ISSUED_STATE_KEY} is {issued!r}")

    graph = graphs.get(template.state_graph)
    if graph is None:
        certificate_graphs = [g.name for g in graphs.values() if g.kind == "certificate"]
        report("state_graph", f"names the state graph {template.state_graph!r}, which does not exist",
               suggest(template.state_graph, certificate_graphs))
    elif graph.kind != "certificate":
        report("state_graph", f"names the state graph {template.state_graph!r}, which is a {graph.kind} "
               "state graph, not a certificate state graph")
    return found
