"""What every configuration loader reports: located problems, and "did you mean".

One type for all of them (state graphs, templates, encoding descriptions, processes), so
start-up can list every violation of every file together."""
from __future__ import annotations

import difflib
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
