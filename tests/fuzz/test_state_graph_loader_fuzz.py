"""Property tests: whatever the input, the state-graph loader loads it or rejects it with
located violations — it never crashes with anything else."""
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.domain.issued_state import check_internal_issued_state
from orchestrator.domain.state_graphs import RFC5280_REASONS, StateGraph, StateGraphError, load_state_graph

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_or_located_error(text: str) -> StateGraph | None:
    try:
        return load_state_graph(text, "fuzz.yaml")
    except StateGraphError as err:
        assert err.violations
        for v in err.violations:
            assert v.source == "fuzz.yaml" and v.line >= 1 and v.message
            assert v.line <= len(text.splitlines()) + 2  # within the text; YAML breaks lines at NEL (\x85) too
        return None


@FUZZ
@given(st.text())
def test_arbitrary_text_never_crashes(text):
    load_or_located_error(text)


# Text built from YAML's own punctuation hits the parser's corners far more often than
# uniform unicode does.
yamlish_text = st.lists(st.sampled_from([
    "name:", "kind:", "start:", "states:", "transitions:", "from:", "to:", "reasons:", "final:",
    "ca_action:", " ", "  ", "\n", "- ", "[", "]", "{", "}", ",", ":", "&a ", "*a", "!!str ", "---",
    "'", '"', "#", "|", ">", "?", "Active", "Issued", "true", "~", "card", "certificate", "\t", "%YAML 1.1",
]), max_size=60).map("".join)


@FUZZ
@given(yamlish_text)
def test_yaml_punctuation_soup_never_crashes(text):
    load_or_located_error(text)


# Structures: anything YAML can dump, and graph-shaped documents with random parts.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.sampled_from(["Active", "Issued", "OnHold", "Actve", "", " ", "On", "keyCompromise"]),
                    st.text(max_size=8))
anything = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8) | st.sampled_from(
        ["name", "kind", "start", "states", "transitions", "from", "to", "reasons", "final", "ca_action"]),
        inner, max_size=4)), max_leaves=20)

state_names = st.sampled_from(["Issued", "Active", "OnHold", "Revoked", "Actve", "Lost"])
state_options = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "ca_action": st.sampled_from((*RFC5280_REASONS, "hold", None)), "final": st.booleans() | scalars}))
transition = st.fixed_dictionaries({}, optional={
    "from": state_names | st.lists(state_names, max_size=3) | anything,
    "to": state_names | anything,
    "reasons": st.lists(st.sampled_from(["suspended", "keyCompromise"]), max_size=2) | scalars})
graph_shaped = st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["G", ""]) | anything,
    "kind": st.sampled_from(["certificate", "card", "certficate"]) | anything,
    "start": state_names | anything,
    "states": st.dictionaries(state_names, state_options, max_size=5) | anything,
    "transitions": st.lists(transition, max_size=6) | anything,
})


@FUZZ
@given(st.one_of(anything, graph_shaped), st.sampled_from(["block", "flow"]))
def test_arbitrary_structures_never_crash(doc, style):
    text = yaml.safe_dump(doc, default_flow_style=(style == "flow"), allow_unicode=True)
    graph = load_or_located_error(text)
    if graph is not None:
        # A loaded graph keeps its promises: start declared, transitions between declared
        # states, final states without a way out, and C14 checks on it don't crash either.
        assert graph.start in graph.states
        for t in graph.transitions:
            assert t.source in graph.states and t.target in graph.states
            assert not graph.states[t.source].final
            assert graph.can_move(t.source, t.target, t.reasons[0] if t.reasons else None)
        for v in check_internal_issued_state("Issued", {graph.name: graph}, []):
            assert v.line >= 1


@st.composite
def valid_graphs(draw):
    """A graph that must load: random states and transitions, every state reachable."""
    names = draw(st.lists(st.from_regex(r"[A-Z][A-Za-z]{0,6}", fullmatch=True), min_size=1, max_size=6, unique=True))
    start = names[0]
    pairs = set(draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(names)), max_size=10)))
    pairs |= {(start, n) for n in names[1:]}  # everything reachable from the start
    sources = {s for s, _ in pairs}
    states = {n: ({"final": True} if n not in sources and draw(st.booleans()) else {}) for n in names}
    transitions = [{"from": s, "to": t, **({"reasons": ["r" + t]} if draw(st.booleans()) else {})}
                   for s, t in sorted(pairs)]
    return {"name": "G", "kind": "card", "start": start, "states": states, "transitions": transitions}


@FUZZ
@given(valid_graphs())
def test_valid_graphs_load_and_moves_match_transitions(doc):
    graph = load_state_graph(yaml.safe_dump(doc, sort_keys=False), "fuzz.yaml")
    declared = {(t["from"], t["to"]): tuple(t.get("reasons", ())) for t in doc["transitions"]}
    for src in graph.states:
        for dst in graph.states:
            reasons = declared.get((src, dst))
            assert graph.can_move(src, dst, reasons[0] if reasons else None) == (reasons is not None)
    assert graph.reachable_from(graph.start) == set(graph.states)
