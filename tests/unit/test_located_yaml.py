"""The located-YAML reader every configuration loader builds on: each problem of a mapping
reported once, at its line, and a file that does not compose reported at the line it breaks."""
from __future__ import annotations

import textwrap

import pytest
from yaml.nodes import Node

from orchestrator.domain.located_yaml import LocatedReader, YamlSyntaxError, compose_yaml, excerpt, kind_of, line_of


def read(text: str, allowed: tuple[str, ...] | None = ("name", "kind", "states"),
         required: tuple[str, ...] = ("name",), null_is_absent: bool = True) -> tuple[dict[str, int], list[str]]:
    """The entries (key -> line of its value) and the violations, as text, of a file's top mapping."""
    reader = LocatedReader("f.yaml")
    root = reader.compose(textwrap.dedent(text), "empty file")
    assert root is not None
    entries = reader.entries(root, "", allowed, required, null_is_absent=null_is_absent) or {}
    return {key: line_of(value) for key, (_key, value) in entries.items()}, [str(v) for v in reader.violations]


def test_every_key_problem_is_reported_at_its_line():
    entries, problems = read("""\
        kind: certificate
        knd: card
        kind: card
        ? [a, b]
        : x
        states: {}
        """)
    assert entries == {"kind": 1, "states": 6}
    assert problems == [
        "f.yaml:2: knd: unknown key 'knd'; allowed: name, kind, states (did you mean 'kind'?)",
        "f.yaml:3: kind: key 'kind' appears twice (first at line 1)",
        "f.yaml:4: a key must be a plain name, found a list",
        "f.yaml:1: name: missing required key 'name'",
    ]


def test_a_misspelled_key_given_twice_is_unknown_once_then_a_duplicate():
    _entries, problems = read("name: a\nnmae: b\nnmae: c\n")
    assert problems == [
        "f.yaml:2: nmae: unknown key 'nmae'; allowed: name, kind, states (did you mean 'name'?)",
        "f.yaml:3: nmae: key 'nmae' appears twice (first at line 2)",
    ]


def test_a_key_with_nothing_after_it_is_absent_unless_asked_to_keep_it():
    entries, problems = read("name:\nkind: card\n")
    assert entries == {"kind": 2} and problems == ["f.yaml:1: name: missing required key 'name'"]
    entries, problems = read("name:\nkind: card\n", null_is_absent=False)
    assert entries == {"name": 1, "kind": 2} and problems == []


def test_any_key_is_accepted_when_none_are_listed():
    entries, problems = read("Active: {}\nOnHold: {}\n", allowed=None, required=())
    assert entries == {"Active": 1, "OnHold": 2} and problems == []


def test_not_a_mapping_says_what_was_found():
    reader = LocatedReader("f.yaml")
    root = reader.compose("- a\n- b\n", "empty file")
    assert root is not None and reader.entries(root, "states", None) is None
    assert [str(v) for v in reader.violations] == ["f.yaml:1: states: expected a mapping, found a list"]


def test_an_empty_file_is_reported_with_the_loaders_words():
    reader = LocatedReader("f.yaml")
    assert reader.compose("# only a comment\n", "empty file; expected a state graph") is None
    assert [str(v) for v in reader.violations] == ["f.yaml:1: empty file; expected a state graph"]


@pytest.mark.parametrize(("text", "line"), [
    ("name: a\nstates:\n  - [unclosed\n", 4),
    ("name: a\nkind: \x07\n", 2),
    ("[" * 5000, 1),
])
def test_a_text_that_does_not_compose_is_located(text, line):
    with pytest.raises(YamlSyntaxError) as caught:
        compose_yaml(text)
    assert caught.value.line == line and caught.value.message.startswith("YAML")


def test_wording_can_be_overridden_by_a_loader():
    class Terse(LocatedReader):
        def duplicate_key(self, key_node: Node, key_path: str, key: str, what: str, first_line: int) -> None:
            self.report(key_node, key_path, f"duplicate {what} {key!r}")

    reader = Terse("f.yaml")
    root = reader.compose("name: a\nname: b\n", "empty file")
    assert root is not None
    reader.entries(root, "", ("name",))
    assert [str(v) for v in reader.violations] == ["f.yaml:2: name: duplicate key 'name'"]


def test_found_values_are_shown_short_and_kinds_by_name():
    root = compose_yaml("long: " + "x" * 60 + "\nnumber: 3\nnothing:\n")
    assert root is not None
    (_k1, long), (_k2, number), (_k3, nothing) = root.value
    assert excerpt(long) == repr("x" * 37 + "...")
    assert (excerpt(nothing), kind_of(number), kind_of(nothing), kind_of(root)) == (
        "nothing", "a number", "nothing", "a mapping")
