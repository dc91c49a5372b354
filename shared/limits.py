"""The size limits of everything a caller sends (docs/limits.md), in one place.

Every request that reaches a servicer of either server is checked by `check_message` before
the servicer runs (shared/rpc.py `rpc_errors`), every message a gateway sends on its link by
the link servicer: a field over its limit is refused with INVALID_ARGUMENT naming the field
(its path in the message, e.g. `hello.readers[3].name`) and the limit. The limits are chosen
so that what one caller sends cannot make the answers others get too large for them (a
reader of the pool carries its gateway's site and labels and its lease's holder), and List
answers are cut into pages by bytes as well as by count (`page_fits`).

Limits of a string field are picked by the field's name: ids, names, secrets, page tokens
have their own; any other string is text. Counts of repeated fields and maps likewise.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Generic, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from shared.errors import InvalidArgument, WatcherTooSlow, quoted

#: gRPC's largest message, sent or received, on every server and channel of cardline.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: What a List answer fills at most: half a message, so an answer always fits.
MAX_PAGE_BYTES = MAX_MESSAGE_BYTES // 2

MAX_ID_CHARS = 128              # *_id, serials
MAX_REQUEST_ID_CHARS = 200      # a client's request_id (docs/api.md, "Request ids")
MAX_NAME_CHARS = 256            # names, holders, sites, reader ids, label values, templates, states
MAX_SECRET_CHARS = 256          # PINs, PUKs, secret process inputs
MAX_PAGE_TOKEN_CHARS = 1024
MAX_TEXT_CHARS = 4096           # any other string (subjects, messages, reasons, process inputs)
MAX_BYTES = 256 * 1024          # any bytes field (certificates, APDU data, data objects, data to sign)
MAX_LABELS = 32                 # entries of a labels map (gateway or selector)
MAX_LABEL_KEY_CHARS = 63
#: A station's enrollment (site and labels, shared/pki.py check_enrollment) is carried in its
#: gateway certificate, and grpcio 1.85's TLS handshake fails to send a certificate beyond about
#: 8 KB (measured: 7,850 bytes connect, 8,506 do not): so fewer, shorter labels than a labels
#: map may hold, and a bound on their encoded size (values may be multi-byte UTF-8).
MAX_ENROLLED_LABELS = 16
MAX_ENROLLED_LABEL_VALUE_CHARS = 128
MAX_ENROLLMENT_BYTES = 4096
MAX_READERS_PER_GATEWAY = 256   # readers announced in a hello
MAX_ITEMS = 1000                # any other repeated field or map (ids to handle, order items, APDUs, inputs)
#: The longest duration accepted anywhere (older_than, --older-than, days): about 100 years.
MAX_DURATION = dt.timedelta(days=36_525)
#: Events a watcher (WatchReaders, StartProcess, WatchOrder, ...) may fall behind before it
#: is dropped with RESOURCE_EXHAUSTED.
MAX_WATCH_BACKLOG = 1000

_ID_NAMES = frozenset({"id", "serial", "serial_hex", "token_serial", "command_id", "task_id"})
_NAME_NAMES = frozenset({"reader_id", "holder", "site", "name", "template", "card_template", "state", "target_state",
                         "token_label", "token_model", "label", "key_label", "process", "definition", "ca",
                         "version", "revoke_reason", "reason", "type", "application"})
_SECRET_NAMES = frozenset({"user_pin", "so_pin", "new_user_pin", "new_so_pin", "puk", "secret_inputs"})
_TOKEN_NAMES = frozenset({"page_token"})
# Text that carries card data (an error's details from a gateway: APDU responses as hex).
_BULK_TEXT_NAMES = frozenset({"metadata", "string_value"})


def text_limit(name: str) -> int:
    """The most characters a string field (or a map value) called NAME may hold."""
    if name in _SECRET_NAMES:
        return MAX_SECRET_CHARS
    if name in _TOKEN_NAMES:
        return MAX_PAGE_TOKEN_CHARS
    if name == "request_id":
        return MAX_REQUEST_ID_CHARS
    if name in _BULK_TEXT_NAMES:
        return 2 * MAX_BYTES + MAX_TEXT_CHARS
    if name in _NAME_NAMES or name == "labels":
        return MAX_NAME_CHARS
    if name in _ID_NAMES or name.endswith("_id"):
        return MAX_ID_CHARS
    return MAX_TEXT_CHARS


def count_limit(name: str) -> int:
    """The most entries a repeated field or map called NAME may hold."""
    if name == "labels":
        return MAX_LABELS
    if name == "readers":
        return MAX_READERS_PER_GATEWAY
    return MAX_ITEMS


def key_limit(name: str) -> int:
    """The most characters of a key of the map called NAME."""
    return MAX_LABEL_KEY_CHARS if name == "labels" else MAX_NAME_CHARS


def too_long(field: str, size: int, limit: int, unit: str) -> InvalidArgument:
    return InvalidArgument(f"{field} is {size} {unit} long; the limit is {limit}", field=field, limit=limit)


def check_text(value: str, field: str, limit: int) -> str:
    """VALUE, or InvalidArgument when it is longer than LIMIT."""
    if len(value) > limit:
        raise too_long(field, len(value), limit, "characters")
    return value


def check_message(message: Message, path: str = "") -> None:
    """Every field of MESSAGE (and of the messages in it) within its limit; InvalidArgument
    naming the first one that is not. Durations are checked too (`check_duration`)."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Duration":
        seconds = message.seconds + message.nanos / 1e9    # type: ignore[attr-defined]
        check_duration(seconds, path or "duration")
        return
    for fd, value in message.ListFields():
        where = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            _check_map(fd, value, where)
        elif fd.is_repeated:
            if len(value) > count_limit(fd.name):
                raise too_long(where, len(value), count_limit(fd.name), "entries")
            for i, item in enumerate(value):
                _check_value(fd, item, f"{where}[{i}]")
        else:
            _check_value(fd, value, where)


def _check_map(fd: FieldDescriptor, value: object, where: str) -> None:
    entries = dict(value)  # type: ignore[call-overload]
    if len(entries) > count_limit(fd.name):
        raise too_long(where, len(entries), count_limit(fd.name), "entries")
    value_fd = fd.message_type.fields_by_name["value"]  # type: ignore[union-attr]  # a map entry's type
    for key, item in entries.items():
        if isinstance(key, str) and len(key) > key_limit(fd.name):
            raise InvalidArgument(f"{where}: the key {quoted(key, 40)} is {len(key)} characters long; the limit is "
                                  f"{key_limit(fd.name)}", field=where, limit=key_limit(fd.name))
        entry = f"{where}[{quoted(key, 40)}]"
        if value_fd.type == FieldDescriptor.TYPE_STRING:
            check_text(item, entry, text_limit(fd.name))
        else:
            _check_value(value_fd, item, entry)


def _check_value(fd: FieldDescriptor, value: object, where: str) -> None:
    if isinstance(value, Message):
        check_message(value, where)
    elif fd.type == FieldDescriptor.TYPE_STRING:
        check_text(str(value), where, text_limit(fd.name))
    elif fd.type == FieldDescriptor.TYPE_BYTES and len(value) > MAX_BYTES:  # type: ignore[arg-type]
        raise too_long(where, len(value), MAX_BYTES, "bytes")  # type: ignore[arg-type]


def check_duration(seconds: float, field: str) -> dt.timedelta:
    """SECONDS as a timedelta, or InvalidArgument when it is not a number or longer than
    MAX_DURATION either way (datetime arithmetic would overflow: an error of the request,
    not of the server)."""
    limit = MAX_DURATION.total_seconds()
    if not math.isfinite(seconds) or abs(seconds) > limit:
        raise InvalidArgument(f"{field} is {seconds:g} s; the limit is {limit:g} s ({MAX_DURATION.days} days)",
                              field=field, limit=int(limit))
    return dt.timedelta(seconds=seconds)


def check_days(days: int, field: str) -> dt.timedelta:
    """DAYS as a timedelta within MAX_DURATION (InvalidArgument otherwise)."""
    if abs(days) > MAX_DURATION.days:
        raise InvalidArgument(f"{field} is {days} days; the limit is {MAX_DURATION.days} days", field=field,
                              limit=MAX_DURATION.days)
    return dt.timedelta(days=days)


def page_fits(sizes: list[int]) -> int:
    """How many of the leading items, of these serialized sizes, one List answer holds: as
    many as stay within MAX_PAGE_BYTES, and at least one."""
    total = 0
    for count, size in enumerate(sizes):
        total += size + 8                   # field tag and length
        if total > MAX_PAGE_BYTES:
            return max(count, 1)
    return len(sizes)


T = TypeVar("T")


class Backlog(Generic[T]):
    """The events one watcher has not read yet, at most LIMIT of them. `put` never blocks the
    work that reports them; when a watcher falls LIMIT events behind, it is dropped: its next
    `get` raises WatcherTooSlow (RESOURCE_EXHAUSTED) saying how far behind it was, and what
    comes after is only counted. Memory stays bounded however slowly a client reads."""

    def __init__(self, limit: int = MAX_WATCH_BACKLOG) -> None:
        self._events: asyncio.Queue[T] = asyncio.Queue(maxsize=limit)
        self.limit = limit
        self.overflow = 0               # events not kept since the watcher was dropped

    def put(self, event: T) -> None:
        if self.overflow:
            self.overflow += 1
            return
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.overflow = 1

    async def get(self) -> T:
        if self.overflow:
            behind = self._events.qsize() + self.overflow
            raise WatcherTooSlow(f"watcher too slow: {behind} events behind (the limit is {self.limit}); "
                                 "watch again to resume from the current state", behind=behind)
        return await self._events.get()

    def empty(self) -> bool:
        return self._events.empty() and not self.overflow
