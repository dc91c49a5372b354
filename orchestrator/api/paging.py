"""Page tokens of the List RPCs (docs/api.md).

A token is opaque to clients: URL-safe base64 of a small JSON object naming where the
previous page ended - (created_at, id) for stored rows (keyset paging, see
orchestrator/store/paging.py), the sort key for lists kept in memory."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from orchestrator.store.paging import Keyset
from shared.errors import InvalidArgument
from shared.limits import page_fits

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def page_size(request: Any) -> int:
    """The request's page size: the default for 0, at most MAX_PAGE_SIZE."""
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _encode(value: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(token: str) -> dict[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument("page_token is not a token this server issued", field="page_token")
    return value


def keyset_of(request: Any) -> Keyset | None:
    """Where the previous page ended, from the request's page_token (None: the first page)."""
    if not request.page_token:
        return None
    value = _decode(request.page_token)
    try:
        return dt.datetime.fromisoformat(value["t"]), value["i"]
    except (KeyError, ValueError):
        raise InvalidArgument("page_token is not a token of this list", field="page_token") from None


def keyset_page(rows: Sequence[T], size: int, key: Callable[[T], Keyset]) -> tuple[Sequence[T], str]:
    """A page from `size + 1` rows fetched past the keyset, and the token of the next page."""
    if len(rows) <= size:
        return rows, ""
    when, ident = key(rows[size - 1])
    return rows[:size], _encode({"t": when.isoformat(), "i": ident})


def memory_page(items: Sequence[T], request: Any, key: Callable[[T], str],
                size_of: Callable[[T], int] | None = None) -> tuple[list[T], str]:
    """A page of a list kept in memory, ordered by `key` (unique), and the next token.
    With `size_of` (an item's serialized bytes), the page also ends where it would pass
    shared.limits.MAX_PAGE_BYTES: items whose size callers choose (labels, holders) never
    make an answer too large to receive."""
    ordered = sorted(items, key=key)
    if request.page_token:
        try:
            last = _decode(request.page_token)["k"]
        except KeyError:
            raise InvalidArgument("page_token is not a token of this list", field="page_token") from None
        ordered = [i for i in ordered if key(i) > last]
    size = page_size(request)
    if size_of is not None:
        size = min(size, page_fits([size_of(i) for i in ordered[:size]]))
    if len(ordered) <= size:
        return ordered, ""
    return ordered[:size], _encode({"k": key(ordered[size - 1])})
