"""Pages of List RPCs (AIP-158): page_size and an opaque page_token naming where the next page
starts."""
from __future__ import annotations

import base64
import binascii

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_PREFIX = "offset:"


def page_window(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, size) of the page asked for; InvalidArgument for a negative size or a token
    this server did not hand out."""
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, not {page_size}", field="page_size")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return 0, size
    try:
        text = base64.urlsafe_b64decode(page_token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    if not text.startswith(_PREFIX) or not text[len(_PREFIX):].isdigit():
        raise InvalidArgument("page_token is not one this server handed out", field="page_token")
    return int(text[len(_PREFIX):]), size


def next_page_token(offset: int, size: int, fetched: int) -> str:
    """The token of the page after this one; fetch size + 1 rows to know whether there is one."""
    if fetched <= size:
        return ""
    return base64.urlsafe_b64encode(f"{_PREFIX}{offset + size}".encode("ascii")).decode("ascii")
