"""Hypothesis strategies for the error catalogue: any instance of a catalogue class, with
values for its typed fields and some free context, as code could raise it."""
from __future__ import annotations

from typing import Any, Literal

from hypothesis import strategies as st

from shared.cards import ApduResponse
from shared.errors import CATALOGUE, CardlineError

# Integers cross protobuf's Struct as doubles: exact up to 2**53, far above any PIN counter,
# APDU index, status word or PKCS#11 slot id.
_INTS = st.integers(min_value=-(2**53), max_value=2**53)
_RESPONSES = st.lists(st.builds(ApduResponse, st.binary(max_size=24), st.integers(0, 0xFFFF)), max_size=4)
# Text is Unicode that UTF-8 can encode (protobuf strings): no lone surrogates. PostgreSQL text
# columns also refuse NUL (tasks.error_message); messages are written by code, so they are
# drawn without it (details may hold it: JSON carries it escaped).
_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
_TEXT = st.text(st.characters(exclude_categories=_SURROGATES), max_size=20)
_MESSAGES = st.text(st.characters(exclude_categories=_SURROGATES, exclude_characters="\x00"), max_size=40)
_NAMES = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)


def _value(kind: Any) -> st.SearchStrategy[Any]:
    if kind is int:
        return _INTS
    if kind is str:
        return _TEXT
    return _RESPONSES


@st.composite
def errors(draw: st.DrawFn, cls: type[CardlineError]) -> CardlineError:
    fields: dict[str, object] = {}
    for name, f in cls._fields.items():
        if f.required or draw(st.booleans()):
            fields[name] = draw(_value(f.kind))
    context = draw(st.dictionaries(_NAMES.filter(lambda n: n not in cls._fields and n != "message"), _TEXT, max_size=3))
    return cls(draw(_MESSAGES), **context, **fields)


any_error = st.sampled_from(sorted(CATALOGUE.values(), key=lambda c: c.reason)).flatmap(errors)


def same_error(a: CardlineError, b: CardlineError) -> bool:
    """Same class, reason, message, typed attributes and context."""
    return (type(a) is type(b) and a.reason == b.reason and a.message == b.message and a.context == b.context
            and all(getattr(a, name) == getattr(b, name) for name in type(a)._fields))
