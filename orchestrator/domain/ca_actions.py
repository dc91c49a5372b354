"""Rule C17, Change State in CA: which CA action a state change implies.

Moving a certificate to a state "in the CA" revokes it, puts it on hold or lifts a hold.
The mapping from a target state to that action is a strict table, because a typo must never
revoke a certificate (docs/certificate-handling.md):

  (a) the target state's declared `ca_action` (state graph file) wins: an RFC 5280 reason
      name -> Revoke(reason); `removeFromCRL` -> LiftHold;
  (b) else a target state whose NAME is an RFC 5280 reason name passes through
      (`keyCompromise` -> Revoke("keyCompromise"); a state named `removeFromCRL` -> LiftHold).
      Letter case is ignored (a state `KeyCompromise`), nothing else is: no fuzzy matching;
  (c) else a hold-like state name (`hold`, `onHold`, `suspended`, `certificateHold`; case,
      `_`, `-` and blanks ignored) -> Revoke("certificateHold");
  (d) else re-activation: moving FROM a hold state (declared `certificateHold`, or a name
      mapped to it by (b)/(c)) TO a state that implies no revocation -> LiftHold;
  (e) anything else -> shared.errors.UnmappedCaAction naming the state and listing the
      states that do map. Nothing has been sent to any CA at that point.

The reason of the move refines a revocation: when the target revokes (not a hold, not a
lift) and the transition's reason is itself an RFC 5280 revocation reason, the CA revokes
with that reason (`Revoked` declares keyCompromise, `Revoked --reason cessationOfOperation`
revokes with cessationOfOperation). Other reasons (`cardLost`) leave the state's action.

Pure domain code: no I/O, no CA, no store. Whether the move itself is allowed is the state
graph's business (StateGraph.require_move); callers check that first.
"""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.domain.state_graphs import RFC5280_REASONS, StateGraph
from orchestrator.domain.violations import suggest
from shared.errors import InvalidArgument, UnmappedCaAction

__all__ = [
    "CERTIFICATE_HOLD",
    "HOLD_LIKE_NAMES",
    "REMOVE_FROM_CRL",
    "CaAction",
    "LiftHold",
    "Revoke",
    "ca_action_for",
    "is_hold_like_name",
    "is_hold_state",
    "mapped_states",
    "state_ca_action",
]

CERTIFICATE_HOLD = "certificateHold"
REMOVE_FROM_CRL = "removeFromCRL"

#: State names (normalised: lower case, without `_`, `-` and blanks) that mean "on hold".
HOLD_LIKE_NAMES = frozenset({"hold", "onhold", "suspended", "certificatehold"})

_REASON_BY_FOLDED_NAME = {r.casefold(): r for r in RFC5280_REASONS}


@dataclass(frozen=True)
class Revoke:
    """Revoke at the CA with an RFC 5280 reason (certificateHold = temporary)."""

    reason: str

    def __post_init__(self) -> None:
        if self.reason not in RFC5280_REASONS or self.reason == REMOVE_FROM_CRL:
            raise InvalidArgument(f"{self.reason!r} is not an RFC 5280 revocation reason"
                                  + (" (removeFromCRL lifts a hold: use LiftHold)" if self.reason == REMOVE_FROM_CRL
                                     else ""), reason_name=self.reason)

    @property
    def name(self) -> str:
        return self.reason

    def to_dict(self) -> dict[str, str]:
        return {"ca_action": "revoke", "ca_reason": self.reason}


@dataclass(frozen=True)
class LiftHold:
    """Take a certificate on certificateHold off the CRL (RFC 5280 removeFromCRL)."""

    @property
    def name(self) -> str:
        return REMOVE_FROM_CRL

    def to_dict(self) -> dict[str, str]:
        return {"ca_action": "lift_hold", "ca_reason": REMOVE_FROM_CRL}


CaAction = Revoke | LiftHold


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch not in "_- \t")


def is_hold_like_name(name: str) -> bool:
    return _normalised(name) in HOLD_LIKE_NAMES


def state_ca_action(graph: StateGraph, state: str) -> str | None:
    """The RFC 5280 reason name a state implies as a TARGET by rules (a)-(c), or None.

    (a) declared `ca_action`; (b) the state's name is a reason name; (c) hold-like name.
    """
    declared = graph.states[state].ca_action if state in graph.states else None
    if declared is not None:
        return declared if declared in RFC5280_REASONS else None
    by_name = _REASON_BY_FOLDED_NAME.get(state.casefold())
    if by_name is not None:
        return by_name
    if is_hold_like_name(state):
        return CERTIFICATE_HOLD
    return None


def is_hold_state(graph: StateGraph, state: str) -> bool:
    """True if being in `state` means the certificate is on certificateHold at the CA."""
    return state_ca_action(graph, state) == CERTIFICATE_HOLD


def mapped_states(graph: StateGraph) -> dict[str, str]:
    """Every state of the graph that maps to a CA action as a target, with its reason name."""
    found = {}
    for name in graph.states:
        action = state_ca_action(graph, name)
        if action is not None:
            found[name] = action
    return found


def revocation_reason_of(reason: str | None) -> str | None:
    """`reason` when it is an RFC 5280 reason that revokes for good, else None."""
    if reason in RFC5280_REASONS and reason not in (REMOVE_FROM_CRL, CERTIFICATE_HOLD):
        return reason
    return None


def ca_action_for(graph: StateGraph, from_state: str, to_state: str, reason: str | None = None) -> CaAction:
    """The CA action of moving a certificate from `from_state` to `to_state` (C17), with the
    transition reason `reason` (see the module doc: an RFC 5280 reason refines a revocation).

    Raises UnmappedCaAction when the table has no entry (rule (e)); the caller must not
    have talked to the CA yet. Does not check that the move is allowed by the graph.
    """
    if to_state in graph.states:
        declared = graph.states[to_state].ca_action
        if declared is not None and declared not in RFC5280_REASONS:
            # The loader refuses this; a graph built in code might not.
            raise UnmappedCaAction(f"state graph {graph.name!r}: state {to_state!r} declares the CA action "
                                   f"{declared!r}, which is not an RFC 5280 reason name; nothing was sent to "
                                   "the CA", graph=graph.name, state=to_state)
        action = state_ca_action(graph, to_state)
        if action == REMOVE_FROM_CRL:                                  # (a) or (b)
            return LiftHold()
        if action is not None:                                         # (a), (b), (c)
            if action != CERTIFICATE_HOLD:
                return Revoke(revocation_reason_of(reason) or action)
            return Revoke(action)
        if from_state in graph.states and is_hold_state(graph, from_state):   # (d)
            return LiftHold()

    mapped = mapped_states(graph)
    listing = ", ".join(f"{name} ({action})" for name, action in mapped.items()) or "none"
    holds = [name for name, action in mapped.items() if action == CERTIFICATE_HOLD]
    if to_state not in graph.states:
        close = suggest(to_state, graph.states)
        what = f"unknown state {to_state!r}" + (f" (did you mean {close!r}?)" if close else "")
    else:
        what = f"state {to_state!r} maps to no CA action"
    reactivation = (f"; a move out of a hold state ({', '.join(holds)}) to a state without revocation "
                    "lifts the hold" if holds else "")
    raise UnmappedCaAction(
        f"state graph {graph.name!r}: {what} (moving from {from_state!r}); states that map to a CA action: "
        f"{listing}{reactivation}. Nothing was sent to the CA: declare `ca_action` on the state to map it",
        graph=graph.name, from_state=from_state, to_state=to_state, mapped=",".join(mapped))
