"""Reading YAML configuration files with a line for every problem.

Every YAML loader (state graphs, templates, processes) walks the composed node tree rather
than constructed values, because nodes carry line numbers, and collects located Violations
instead of stopping at the first one. What they share lives here: composing the text,
node helpers, and `LocatedReader`, the base that reports violations and reads a mapping's
keys (bad, duplicate, unknown, missing). Each loader keeps its own wording by overriding the
`*_key` / `not_a_mapping` methods, so its messages stay what its operators know.

Pure domain code: PyYAML only.
"""
from __future__ import annotations

from collections.abc import Collection

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.domain.violations import Violation, suggest

NULL_TAG = "tag:yaml.org,2002:null"
STR_TAG = "tag:yaml.org,2002:str"
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
BOOL_TAG = "tag:yaml.org,2002:bool"

# The C loader when PyYAML has it: the same nodes and marks, faster.
FAST_YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: A mapping's entries by key: (key node, value node); the key node locates the key itself.
Entries = dict[str, tuple[Node, Node]]


class YamlSyntaxError(Exception):
    """A YAML text that does not compose, located."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def compose_yaml(text: str, loader: type[yaml.SafeLoader] = FAST_YAML_LOADER) -> Node | None:
    """The YAML node tree (line numbers for every violation), or YamlSyntaxError with the line."""
    try:
        return yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(str(part) for part in (e.context, e.problem) if part) or "invalid YAML"
        column = f" (column {mark.column + 1})" if mark else ""
        raise YamlSyntaxError(mark.line + 1 if mark else 1, f"YAML syntax error: {what}{column}") from None
    except yaml.reader.ReaderError as e:        # a character YAML does not allow: a position, no mark
        char = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
        raise YamlSyntaxError(text.count("\n", 0, e.position) + 1,
                              f"YAML syntax error: character U+{char:04X} is not allowed") from None
    except yaml.YAMLError as e:
        raise YamlSyntaxError(1, f"YAML syntax error: {e}") from None
    except RecursionError:                      # PyYAML composes recursively: absurd nesting must not crash
        raise YamlSyntaxError(1, "YAML nested too deeply") from None


def line_of(node: Node) -> int:
    """The 1-based line a node starts on."""
    return int(node.start_mark.line) + 1


def is_null(node: Node | None) -> bool:
    """True for a key written with nothing after it (or `null`, `~`)."""
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def excerpt(node: Node) -> str:
    """What was found, for "expected X, found Y": the kind of a collection, else the text."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == NULL_TAG:
        return "nothing"
    value = str(node.value)
    return repr(value if len(value) <= 40 else value[:37] + "...")


def kind_of(node: Node | None) -> str:
    """The kind of a node, for "must be X, not Y" (never its text, which may be long)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node is None or node.tag == NULL_TAG:
        return "nothing"
    return {INT_TAG: "a number", FLOAT_TAG: "a number", BOOL_TAG: "a boolean"}.get(
        node.tag, f"a value tagged {node.tag}")


def join_path(path: str, key: str) -> str:
    """The field path of `key` inside `path` ("" is the top of the file)."""
    return f"{path}.{key}" if path else key


class LocatedReader:
    """Collects the violations of one source while a loader walks its node tree.

    The default wording of the key problems is "expected a mapping, found ...", "... appears
    twice (first at line N)", "unknown ...; allowed: ..." with a did-you-mean suggestion.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.violations: list[Violation] = []

    def report(self, where: Node | int, path: str, message: str, suggestion: str | None = None) -> None:
        line = where if isinstance(where, int) else line_of(where)
        self.violations.append(Violation(self.source, max(line, 1), path, message, suggestion))

    def compose(self, text: str, if_empty: str, loader: type[yaml.SafeLoader] = FAST_YAML_LOADER) -> Node | None:
        """The root node, or None after reporting a syntax error or (with `if_empty`) an empty file."""
        try:
            root = compose_yaml(text, loader)
        except YamlSyntaxError as e:
            self.report(e.line, "", e.message)
            return None
        if root is None:
            self.report(1, "", if_empty)
        return root

    def entries(self, node: Node, path: str, allowed: Collection[str] | None, required: Collection[str] = (),
                what: str = "key", null_is_absent: bool = True) -> Entries | None:
        """The entries of a mapping node by key, each bad, duplicate, unknown and missing key
        reported. `allowed=None` accepts any key (names chosen by the file, e.g. states).
        With `null_is_absent`, a key with nothing after it counts as not given."""
        if not isinstance(node, MappingNode):
            self.not_a_mapping(node, path, what)
            return None
        entries: Entries = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = self.key_name(key_node, path, what)
            if key is None:
                continue
            key_path = join_path(path, key)
            if key in first_line:
                self.duplicate_key(key_node, key_path, key, what, first_line[key])
                continue
            first_line[key] = line_of(key_node)
            if allowed is not None and key not in allowed:
                self.unknown_key(key_node, key_path, key, what, allowed)
            elif not (null_is_absent and is_null(value_node)):
                entries[key] = (key_node, value_node)
        for key in required:
            if key not in entries:
                self.missing_key(node, path, key, what)
        return entries

    # -- wording, overridden by loaders whose messages differ -----------------------------

    def not_a_mapping(self, node: Node, path: str, what: str) -> None:
        self.report(node, path, f"expected a mapping, found {excerpt(node)}")

    def key_name(self, key_node: Node, path: str, what: str) -> str | None:
        """The key as text, or None after reporting a key that is not a plain name."""
        if not isinstance(key_node, ScalarNode) or key_node.tag == NULL_TAG or not key_node.value.strip():
            self.report(key_node, path, f"a {what} must be a plain name, found {excerpt(key_node)}")
            return None
        return str(key_node.value)

    def duplicate_key(self, key_node: Node, key_path: str, key: str, what: str, first_line: int) -> None:
        self.report(key_node, key_path, f"{what} {key!r} appears twice (first at line {first_line})")

    def unknown_key(self, key_node: Node, key_path: str, key: str, what: str, allowed: Collection[str]) -> None:
        self.report(key_node, key_path, f"unknown {what} {key!r}; allowed: {', '.join(allowed)}",
                    suggest(key, allowed))

    def missing_key(self, node: Node, path: str, key: str, what: str) -> None:
        self.report(node, join_path(path, key), f"missing required {what} {key!r}")
