"""State graphs: the states of a certificate or a card and the moves allowed between them.

A state graph is data, one YAML file per graph (format: docs/state-graphs.md). Loading is
strict and reports every problem of every file at once, each located by file, line and
field path, because an operator fixing a configuration at start-up should not have to
restart once per typo.

Pure domain code: the only I/O is reading the files handed to `load_state_graphs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import Node, ScalarNode, SequenceNode

from orchestrator.domain.located_yaml import BOOL_TAG, Entries, LocatedReader, excerpt, is_null, line_of
from orchestrator.domain.violations import Violation, did_you_mean, suggest

__all__ = [  # Violation and suggest are re-exported: callers of the state graphs use them too
    "DEFAULT_INTERNAL_ISSUED_STATE", "KINDS", "RFC5280_REASONS", "CertificateMove", "IllegalMove", "State",
    "StateGraph",
    "StateGraphError", "Transition", "Violation", "load_state_graph", "load_state_graphs", "suggest",
]

#: The reason names of RFC 5280 §5.3.1, the only CA actions a state may imply (C17).
#: `removeFromCRL` lifts a hold. Anything else is refused at load: a typo must never end
#: up as a revocation.
RFC5280_REASONS = (
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "removeFromCRL",
    "privilegeWithdrawn",
    "aACompromise",
)

KINDS = ("certificate", "card")

#: Default name of the internal issued state (C14/C15). The configuration key that
#: overrides it lives in issued_state.py.
DEFAULT_INTERNAL_ISSUED_STATE = "Issued"

_TOP_KEYS = ("name", "kind", "start", "states", "transitions", "description", "certificate_graph")
_TOP_REQUIRED = ("name", "kind", "start", "states")
_STATE_KEYS = ("ca_action", "final", "description")
_TRANSITION_KEYS = ("from", "to", "reasons", "certificates")
_CERTIFICATE_MOVE_KEYS = ("state", "reason")
_TRANSITION_REQUIRED = ("from", "to")


# --------------------------------------------------------------------------- errors


class StateGraphError(ValueError):
    """The state graphs (or rules about them, C14/C15) are invalid; lists every violation."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = sorted(violations, key=lambda v: (v.source, v.line, v.field_path, v.message))
        count = len(self.violations)
        lines = "\n".join(f"  {v}" for v in self.violations)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in state graphs:\n{lines}")


class IllegalMove(ValueError):
    """A state change the graph does not allow (or an unknown state, or a wrong reason)."""

    def __init__(self, message: str, *, graph: str, source: str, target: str, reason: str | None) -> None:
        super().__init__(message)
        self.graph, self.source, self.target, self.reason = graph, source, target, reason


# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class State:
    name: str
    ca_action: str | None = None  # RFC 5280 reason name the state implies in the CA (C17)
    final: bool = False  # no way out
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class CertificateMove:
    """What a card transition does to the card's certificates: move them, through their CA
    (C17), to `state` of the card graph's certificate graph, with transition reason `reason`."""
    state: str
    reason: str | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Transition:
    source: str  # state name (not a file: a `from: [A, B]` entry yields one Transition each)
    target: str
    reasons: tuple[str, ...] = ()  # when not empty, a move must give one of these
    line: int = field(default=0, compare=False)
    path: str = field(default="", compare=False)
    certificates: CertificateMove | None = None   # card graphs: the card's certificates follow

    def allows(self, reason: str | None) -> bool:
        # A transition that declares reasons needs one of them; one that declares none takes
        # none, so a reason meant for another transition is not silently accepted.
        return reason in self.reasons if self.reasons else reason is None


@dataclass(frozen=True)
class StateGraph:
    name: str
    kind: str  # "certificate" or "card"
    start: str
    states: dict[str, State]
    transitions: tuple[Transition, ...]
    source: str = field(default="", compare=False)  # file it was loaded from
    line: int = field(default=0, compare=False)  # line of its `name`
    # Card graphs: the certificate graph of the card's certificates, which the `certificates`
    # of its transitions name states of.
    certificate_graph: str | None = None

    @property
    def final_states(self) -> frozenset[str]:
        return frozenset(s.name for s in self.states.values() if s.final)

    def transition(self, src: str, dst: str) -> Transition | None:
        return next((t for t in self.transitions if t.source == src and t.target == dst), None)

    def targets(self, src: str) -> tuple[str, ...]:
        return tuple(t.target for t in self.transitions if t.source == src)

    def can_move(self, src: str, dst: str, reason: str | None = None) -> bool:
        t = self.transition(src, dst)
        return t is not None and t.allows(reason)

    def require_move(self, src: str, dst: str, reason: str | None = None) -> Transition:
        """Returns the transition src → dst, or raises IllegalMove saying why not."""
        def fail(message: str) -> IllegalMove:
            return IllegalMove(f"state graph {self.name!r}: {message}", graph=self.name, source=src,
                               target=dst, reason=reason)

        for state in (src, dst):
            if state not in self.states:
                raise fail(f"unknown state {state!r}" + did_you_mean(state, self.states))
        t = self.transition(src, dst)
        if t is None:
            allowed = ", ".join(self.targets(src)) or ("none, it is final" if self.states[src].final else "none")
            raise fail(f"no transition {src} → {dst} (from {src}: {allowed})")
        if not t.allows(reason):
            if t.reasons:
                given = f"reason {reason!r}" if reason is not None else "no reason"
                raise fail(f"transition {src} → {dst} needs one of the reasons {', '.join(t.reasons)}; "
                           f"got {given}" + (did_you_mean(reason, t.reasons) if reason else ""))
            raise fail(f"transition {src} → {dst} takes no reason; got {reason!r}")
        return t

    def reachable_from(self, state: str) -> frozenset[str]:
        """Every state reachable from `state` by zero or more transitions (so including it)."""
        seen, todo = {state}, [state]
        while todo:
            for nxt in self.targets(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return frozenset(seen)


# --------------------------------------------------------------------------- loading


def load_state_graph(text: str, source: str,
                     internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE) -> StateGraph:
    """Parses one state graph; raises StateGraphError listing every violation.

    `internal_issued_state` is only used to exempt that state of a certificate graph from
    the reachability check: it is entered from outside the graph, when the CA answers (C1).
    """
    graph, violations = _parse(text, source, internal_issued_state)
    if violations:
        raise StateGraphError(violations)
    assert graph is not None
    return graph


def load_state_graphs(directory: str | Path,
                      internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE) -> dict[str, StateGraph]:
    """Loads every *.yaml / *.yml file of `directory`, keyed by graph name.

    Every violation of every file is collected before raising one StateGraphError.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StateGraphError([Violation(str(directory), 1, "", "state graph directory does not exist")])
    graphs: dict[str, StateGraph] = {}
    violations: list[Violation] = []
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        source = str(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            violations.append(Violation(source, line, "", f"not UTF-8 text (byte {e.start})"))
            continue
        graph, found = _parse(text, source, internal_issued_state)
        violations += found
        if graph is None:
            continue
        if graph.name in graphs:
            first = graphs[graph.name]
            violations.append(Violation(source, graph.line, "name", f"state graph {graph.name!r} is already "
                                        f"defined in {first.source}:{first.line}"))
            continue
        graphs[graph.name] = graph
    if not violations:
        # Imported here: the check maps moves to CA actions (ca_actions.py imports this module).
        from orchestrator.domain.card_certificates import check_certificate_moves
        violations += check_certificate_moves(graphs)
    if violations:
        raise StateGraphError(violations)
    return graphs


class _Checker(LocatedReader):
    """Walks the composed YAML nodes (they carry line numbers) and collects violations."""

    def compose_graph(self, text: str) -> Node | None:
        # The pure-Python loader: its syntax errors name what it found (a tab, an undefined
        # alias), which the C loader's do not; graph files are small.
        return self.compose(text, "empty file; expected a state graph (name, kind, start, states, transitions)",
                            yaml.SafeLoader)

    def mapping(self, node: Node, path: str, what: str, allowed: tuple[str, ...] | None = None,
                required: tuple[str, ...] = (), null_is_empty: bool = False) -> Entries | None:
        """The entries of a mapping node by key (a key with nothing after it included).

        `allowed=None` accepts any key (state names); `what` names a key in messages.
        """
        if null_is_empty and is_null(node):
            return {}
        return self.entries(node, path, allowed, required, what, null_is_absent=False)

    def missing_key(self, node: Node, path: str, key: str, what: str) -> None:
        self.report(node, path, f"missing required key {key!r}")

    def name(self, node: Node, path: str) -> str | None:
        # Names are taken literally from the text, so a state called `On` or `No` stays a
        # name instead of turning into a YAML 1.1 boolean.
        if not isinstance(node, ScalarNode):
            self.report(node, path, f"expected a name, found {excerpt(node)}")
            return None
        if is_null(node) or not node.value.strip():
            self.report(node, path, "expected a name, found nothing")
            return None
        return str(node.value)

    def names(self, node: Node, path: str, allow_empty: bool) -> list[tuple[str, Node]]:
        """A name or a list of names, each with its node (for its line)."""
        if isinstance(node, SequenceNode):
            if not node.value and not allow_empty:
                self.report(node, path, "expected at least one name, found an empty list")
            found = []
            for i, item in enumerate(node.value):
                name = self.name(item, f"{path}[{i}]")
                if name is not None:
                    found.append((name, item))
            return found
        if allow_empty and is_null(node):
            return []
        name = self.name(node, path)
        return [(name, node)] if name is not None else []

    def known(self, name: str, node: Node, path: str, states: dict[str, State] | None) -> bool:
        if states is None:  # the states themselves are broken: don't pile up follow-on errors
            return False
        if name in states:
            return True
        self.report(node, path, f"state {name!r} is not declared in states", suggest(name, states))
        return False


def _parse(text: str, source: str, internal_issued_state: str) -> tuple[StateGraph | None, list[Violation]]:
    c = _Checker(source)
    root = c.compose_graph(text)
    if root is None:
        return None, c.violations
    top = c.mapping(root, "", "key", _TOP_KEYS, _TOP_REQUIRED)
    if top is None:
        return None, c.violations

    name = c.name(top["name"][1], "name") if "name" in top else None
    graph_line = line_of(top["name"][0]) if "name" in top else line_of(root)

    kind = None
    if "kind" in top:
        kind = c.name(top["kind"][1], "kind")
        if kind is not None and kind not in KINDS:
            c.report(top["kind"][1], "kind", f"unknown kind {kind!r}; expected one of: {', '.join(KINDS)}",
                     suggest(kind, KINDS))
            kind = None

    states = _parse_states(c, top["states"][1]) if "states" in top else None

    start = None
    if "start" in top:
        start = c.name(top["start"][1], "start")
        if start is not None and not c.known(start, top["start"][1], "start", states):
            start = None

    transitions = _parse_transitions(c, top["transitions"][1], states) if "transitions" in top else []

    certificate_graph = None
    if "certificate_graph" in top:
        certificate_graph = c.name(top["certificate_graph"][1], "certificate_graph")
        if kind == "certificate":
            c.report(top["certificate_graph"][1], "certificate_graph", "only a card graph names a certificate graph")
    for t in transitions:
        if t.certificates is not None and kind == "certificate":
            c.report(t.line, f"{t.path}.certificates", "only the transitions of a card graph move certificates")
        elif t.certificates is not None and certificate_graph is None and "certificate_graph" not in top:
            c.report(t.line, f"{t.path}.certificates", "the card's certificates are moved, but the graph names no "
                     "`certificate_graph` whose states `certificates.state` refers to")

    # A final state is a promise that nothing follows it.
    for t in transitions:
        if states is not None and states[t.source].final:
            c.report(t.line, f"{t.path}.from", f"state {t.source!r} is final but has a transition to {t.target!r}")

    # Every state must be reachable from the start, except a certificate graph's internal
    # issued state: the store puts a certificate there on receipt, from outside the graph.
    if states is not None and start is not None:
        probe = StateGraph(name or "", kind or "", start, states, tuple(transitions))
        reachable = probe.reachable_from(start)
        for state in states.values():
            exempt = kind != "card" and state.name == internal_issued_state
            if state.name not in reachable and not exempt:
                c.report(state.line, f"states.{state.name}", f"state {state.name!r} is unreachable from the "
                         f"start state {start!r}")

    if c.violations:
        return None, c.violations
    assert name is not None and kind is not None and start is not None and states is not None
    return StateGraph(name, kind, start, states, tuple(transitions), source=source, line=graph_line,
                      certificate_graph=certificate_graph), []


def _parse_states(c: _Checker, node: Node) -> dict[str, State] | None:
    entries = c.mapping(node, "states", "state")
    if entries is None:
        return None
    if not entries and not any(v.field_path.startswith("states") for v in c.violations):
        c.report(node, "states", "declares no states")
    states: dict[str, State] = {}
    for state_name, (key, value) in entries.items():
        path = f"states.{state_name}"
        fields = c.mapping(value, path, "key", _STATE_KEYS, null_is_empty=True) or {}
        ca_action = None
        if "ca_action" in fields:
            vnode = fields["ca_action"][1]
            if not is_null(vnode):
                ca_action = c.name(vnode, f"{path}.ca_action")
                if ca_action is not None and ca_action not in RFC5280_REASONS:
                    c.report(vnode, f"{path}.ca_action", f"unknown CA action {ca_action!r}; expected an RFC 5280 "
                             f"reason name: {', '.join(RFC5280_REASONS)}", suggest(ca_action, RFC5280_REASONS))
                    ca_action = None
        final = False
        if "final" in fields:
            vnode = fields["final"][1]
            if isinstance(vnode, ScalarNode) and vnode.tag == BOOL_TAG:
                final = yaml.SafeLoader.bool_values[vnode.value.lower()]
            else:
                c.report(vnode, f"{path}.final", f"expected true or false, found {excerpt(vnode)}")
        if "description" in fields and not isinstance(fields["description"][1], ScalarNode):
            c.report(fields["description"][1], f"{path}.description", "expected text")
        states[state_name] = State(state_name, ca_action, final, line=line_of(key))
    return states


def _parse_transitions(c: _Checker, node: Node, states: dict[str, State] | None) -> list[Transition]:
    if is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        c.report(node, "transitions", f"expected a list of transitions, found {excerpt(node)}")
        return []
    transitions: list[Transition] = []
    first_line: dict[tuple[str, str], int] = {}
    for i, item in enumerate(node.value):
        path = f"transitions[{i}]"
        fields = c.mapping(item, path, "key", _TRANSITION_KEYS, _TRANSITION_REQUIRED)
        if fields is None:
            continue
        sources = c.names(fields["from"][1], f"{path}.from", allow_empty=False) if "from" in fields else []
        target = c.name(fields["to"][1], f"{path}.to") if "to" in fields else None
        reasons = c.names(fields["reasons"][1], f"{path}.reasons", allow_empty=True) if "reasons" in fields else []
        ok_sources = [s for s, snode in sources if c.known(s, snode, f"{path}.from", states)]
        if target is None or not c.known(target, fields["to"][1], f"{path}.to", states):
            continue
        reason_names = tuple(dict.fromkeys(r for r, _ in reasons))  # keep order, drop repeats
        move = _parse_certificate_move(c, fields["certificates"][1], f"{path}.certificates") \
            if "certificates" in fields else None
        for s in ok_sources:
            if (s, target) in first_line:
                c.report(item, path, f"duplicate transition {s} → {target} (first at line {first_line[(s, target)]}); "
                         "list all its reasons in one transition")
                continue
            first_line[(s, target)] = line_of(item)
            transitions.append(Transition(s, target, reason_names, line=line_of(item), path=path,
                                          certificates=move))
    return transitions


def _parse_certificate_move(c: _Checker, node: Node, path: str) -> CertificateMove | None:
    fields = c.mapping(node, path, "key", _CERTIFICATE_MOVE_KEYS, ("state",))
    if fields is None or "state" not in fields:
        return None
    state = c.name(fields["state"][1], f"{path}.state")
    reason = c.name(fields["reason"][1], f"{path}.reason") if "reason" in fields else None
    if state is None or ("reason" in fields and reason is None):
        return None
    return CertificateMove(state, reason, line=line_of(fields["state"][1]))
