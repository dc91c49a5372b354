"""`${name}` expressions: the only computation a process definition holds.

Pure domain code.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from orchestrator.domain.processes.descriptor import describe_value

VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WHOLE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


class ExpressionError(ValueError):
    """A `${...}` expression is malformed, or cannot be rendered."""


class MissingVariable(ExpressionError):
    """A template reads a process variable that has no value."""

    def __init__(self, name: str, template: str) -> None:
        super().__init__(f"process variable {name!r} has no value (needed by {template!r})")
        self.name = name


def _scan(template: str) -> Iterator[tuple[str, bool]]:
    """Yields (piece, is_variable) in order. There is no escape: `${` always opens an
    expression; values substituted in are never scanned again, so they may hold anything."""
    i = 0
    while (start := template.find("${", i)) != -1:
        end = template.find("}", start + 2)
        if end == -1:
            raise ExpressionError(f"'${{' at position {start} is never closed with '}}'")
        inner = template[start + 2:end]
        if "${" in inner:
            raise ExpressionError(f"'${{' at position {start} is not closed before the next '${{' (no nesting)")
        if not inner:
            raise ExpressionError(f"empty expression '${{}}' at position {start}")
        if not VARIABLE_NAME.match(inner):
            raise ExpressionError(f"{inner!r} in '${{{inner}}}' is not a variable name "
                                  "(letters, digits and _, not starting with a digit)")
        if start > i:
            yield template[i:start], False
        yield inner, True
        i = end + 1
    if i < len(template):
        yield template[i:], False


def variables_in(template: str) -> tuple[str, ...]:
    """Names of every `${name}` in template, in order; raises ExpressionError if malformed."""
    return tuple(piece for piece, is_variable in _scan(template) if is_variable)


def variable_of(expr: object) -> str | None:
    """The name if expr is exactly one `${name}` and nothing else, otherwise None."""
    if not isinstance(expr, str):
        return None
    match = _WHOLE_VARIABLE.match(expr)
    return match.group(1) if match else None


def render(template: str, process_map: Mapping[str, object]) -> str:
    """Substitutes every `${name}` with the text of its value.

    Secrets never live in the process map: pass `collections.ChainMap(secrets, process_map)`
    to render a field that needs a PIN. Only text and numbers can be substituted; a
    CoreObjectDescriptor is passed around whole (see variable_of), never pasted into text.
    """
    out = []
    for piece, is_variable in _scan(template):
        if not is_variable:
            out.append(piece)
            continue
        value = process_map.get(piece)
        if value is None:
            raise MissingVariable(piece, template)
        if not isinstance(value, (str, int, float)):
            raise ExpressionError(f"process variable {piece!r} holds {describe_value(value)}, "
                                  f"which cannot be put into text ({template!r})")
        out.append(str(value))
    return "".join(out)

