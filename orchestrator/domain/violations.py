"""What every configuration loader reports: located problems, and "did you mean".

One type for all of them (state graphs, templates, encoding descriptions, processes), so
start-up can list every violation of every file together."""
from __future__ import annotations

import difflib

import yaml
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One thing wrong (or, as a warning, doubtful) in a configuration file."""

    source: str                     # the file (or other origin)
    line: int                       # 1-based; 0 when the line is not known
    field_path: str                 # e.g. "transitions[2].to", "Application_A.CertificateTemplate"; "" for the file
    message: str
    suggestion: str | None = None   # "did you mean" for a misspelled name or key

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line > 0 else self.source
        hint = f" (did you mean {self.suggestion!r}?)" if self.suggestion else ""
        return f"{where}: " + (f"{self.field_path}: " if self.field_path else "") + self.message + hint


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The closest of `choices` to `word`; None when nothing is close. A slip of case wins."""
    choices = list(choices)
    for choice in choices:
        if choice.casefold() == word.casefold():
            return choice
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:       # difflib is case-sensitive and case slips score low on long words
        folded = {c.casefold(): c for c in choices}
        close = [folded[m] for m in difflib.get_close_matches(word.casefold(), list(folded), n=1, cutoff=0.6)]
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest choice, or ``""``."""
    close = suggest(word, choices)
    return f" (did you mean {close!r}?)" if close else ""


# The C loader when PyYAML has it: the same nodes and marks, faster.
FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlSyntaxError(Exception):
    """A YAML text that does not compose, located."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def compose_yaml(text: str, loader=FAST_YAML_LOADER) -> yaml.Node | None:
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
