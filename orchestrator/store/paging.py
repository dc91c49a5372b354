"""Keyset paging: lists ordered by (created_at, id) continue after the last row of the
previous page, so a page never repeats nor skips a row, whatever was added meanwhile."""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import and_, or_

# (created_at, id) of the last row of the previous page.
Keyset = tuple[dt.datetime, str]


def after(q: Any, created_at: Any, ident: Any, key: Keyset | None, *, newest_first: bool = False) -> Any:
    """`q` limited to rows past `key` in its order, and ordered by (created_at, id)."""
    if key is not None:
        when, last = key
        if newest_first:
            q = q.where(or_(created_at < when, and_(created_at == when, ident < last)))
        else:
            q = q.where(or_(created_at > when, and_(created_at == when, ident > last)))
    if newest_first:
        return q.order_by(created_at.desc(), ident.desc())
    return q.order_by(created_at, ident)
