"""The error catalogue: every failure cardline reports has a stable reason and a gRPC code.

Code raises a subclass of CardlineError; servicers turn it into a gRPC status, step results on
the gateway link carry it in common.v1.Error, and a failed card task keeps it in its row. Each
way goes through the same data: `to_details()` and `from_details()`, so the receiving side gets
the same class with the same typed attributes. Clients match on the class or on `reason`,
never on message text.

The classes come in families (card I/O with PIN and APDU, gateway link, CA, configuration,
stored objects and states, authorization). A class declares its typed data as annotated
attributes, as yubikit's `InvalidPinError.attempts_remaining` does; keywords a class does not
declare are kept as text in `context` (identifiers, names, paths for people and logs).

`code` is the name of a gRPC status code; this module imports no grpc so that domain code may
raise these errors (shared/rpc.py maps the name to grpc.StatusCode).
"""
from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from shared.cards import ApduResponse

DOMAIN = "cardline"

# The data form of an error's details: what JSON, protobuf Struct and ErrorInfo can carry.
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]
Details = dict[str, JsonValue]


# --- typed fields -----------------------------------------------------------------------

class _Field:
    """One declared attribute: its converters between the Python value and the JSON value."""

    def __init__(self, kind: object, optional: bool, required: bool) -> None:
        self.kind, self.optional, self.required = kind, optional, required   # kind: the type without None
        self._parse, self.dump = _CONVERTERS[kind]

    def parse(self, value: object, where: str) -> Any:
        if value is None and self.optional:
            return None
        return self._parse(value, where)


def _parse_str(value: object, where: str) -> str:
    if isinstance(value, (dict, list, tuple)):
        raise TypeError(f"{where}: expected text, got {value!r}")
    return str(value)


def _parse_int(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():    # protobuf Struct numbers are doubles
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise TypeError(f"{where}: expected an integer, got {value!r}")


def _parse_responses(value: object, where: str) -> tuple[ApduResponse, ...]:
    if value is None:
        return ()
    if isinstance(value, str):      # the text form (ErrorInfo metadata)
        try:
            value = json.loads(value)
        except ValueError:
            raise TypeError(f"{where}: not a JSON list: {value!r}") from None
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: expected a list of APDU responses, got {value!r}")
    return tuple(_parse_response(r, f"{where}[{i}]") for i, r in enumerate(value))


def _parse_response(value: object, where: str) -> ApduResponse:
    if isinstance(value, ApduResponse):
        return value
    if isinstance(value, dict) and isinstance(value.get("data"), str):
        try:
            return ApduResponse(bytes.fromhex(value["data"]), _parse_int(value.get("sw"), f"{where}.sw"))
        except ValueError as exc:
            raise TypeError(f"{where}.data: not hex: {exc}") from None
    raise TypeError(f"{where}: expected an APDU response ({{'data': hex, 'sw': int}}), got {value!r}")


def _dump_responses(value: tuple[ApduResponse, ...]) -> JsonValue:
    return [{"data": r.data.hex().upper(), "sw": r.sw} for r in value]


def _unchanged(value: Any) -> JsonValue:
    return typing.cast(JsonValue, value)


_CONVERTERS: dict[object, tuple[Callable[[object, str], Any], Callable[[Any], JsonValue]]] = {
    str: (_parse_str, _unchanged),
    int: (_parse_int, _unchanged),
    tuple[ApduResponse, ...]: (_parse_responses, _dump_responses),
}


def _fields_of(cls: type[CardlineError]) -> dict[str, _Field]:
    base = set(typing.get_type_hints(CardlineError))
    hints = typing.get_type_hints(cls, globalns=globals())
    out: dict[str, _Field] = {}
    for name, hint in hints.items():
        if name in base or typing.get_origin(hint) is ClassVar:
            continue
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or inner[0] not in _CONVERTERS:
            raise TypeError(f"{cls.__name__}.{name}: no converter for {hint}")
        has_default = any(name in c.__dict__ for c in cls.__mro__)
        out[name] = _Field(inner[0], optional=len(inner) != len(args), required=not has_default)
    return out


class CardlineError(Exception):
    """The base of the catalogue; as such, an internal error (reason INTERNAL)."""

    reason: str = "INTERNAL"        # stable; a class attribute (an instance may carry an unknown peer's reason)
    code: ClassVar[str] = "INTERNAL"
    message: str
    context: dict[str, str]         # keywords the class declares no field for, as text
    _fields: ClassVar[dict[str, _Field]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = _fields_of(cls)
        if "reason" in cls.__dict__:
            if cls.reason in CATALOGUE:
                raise TypeError(f"reason {cls.reason} is already {CATALOGUE[cls.reason].__name__}'s")
            CATALOGUE[cls.reason] = cls

    def __init__(self, message: str, **details: object) -> None:
        """ErrorClass("what happened", field=value, ...): declared fields are checked and
        converted to their type (the text and JSON forms are accepted too); other keywords go
        to `context` as text."""
        super().__init__(message)
        self.message = message
        missing = [name for name, f in self._fields.items() if f.required and details.get(name) is None]
        if missing:
            raise TypeError(f"{type(self).__name__} needs {', '.join(missing)}")
        for name, f in self._fields.items():
            setattr(self, name, f.parse(details.pop(name, None), f"{type(self).__name__}.{name}"))
        self.context = {k: str(v) for k, v in details.items() if v is not None}

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self) -> tuple[Callable[..., CardlineError], tuple[str, str, Details]]:
        return from_details, (self.reason, self.message, self.to_details())

    def to_details(self) -> Details:
        """The typed fields (those set) and the context, as JSON values."""
        out: Details = dict(self.context)
        for name, f in self._fields.items():
            value = getattr(self, name)
            if value is not None and value != ():
                out[name] = f.dump(value)
        return out

    @classmethod
    def from_details(cls, message: str, details: Mapping[str, JsonValue]) -> CardlineError:
        """The inverse of to_details() for this class."""
        return cls(message, **details)

    @property
    def metadata(self) -> dict[str, str]:
        """The details as text (google.rpc.ErrorInfo.metadata, logs, displays)."""
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.to_details().items()}


CATALOGUE: dict[str, type[CardlineError]] = {"INTERNAL": CardlineError}


def from_details(reason: str, message: str, details: Mapping[str, JsonValue] | None = None) -> CardlineError:
    """Rebuilds the error a remote side or a stored row reported. An unknown reason (a newer
    peer's), or details that do not fit the class, give a CardlineError that keeps the reason,
    and the details as text in `context`."""
    cls = CATALOGUE.get(reason)
    if cls is not None:
        try:
            return cls.from_details(message, details or {})
        except TypeError as exc:        # a peer's details that do not fit: keep reason and text
            details = {**(details or {}), "details_error": str(exc)}
    err = CardlineError(message, **{k: _text(v) for k, v in (details or {}).items()})
    err.reason = reason
    return err


def from_reason(reason: str, message: str, metadata: Mapping[str, str] | None = None) -> CardlineError:
    """from_details() for callers that hold text only (ErrorInfo metadata, older rows)."""
    return from_details(reason, message, dict(metadata or {}))


# --- card I/O ---------------------------------------------------------------------------

class CardError(CardlineError):
    """Family: talking to a reader, a card or a token."""

    reader_id: str | None = None
    slot_id: int | None = None      # PKCS#11 slot


class ReaderNotFound(CardError):
    """No such reader on the gateway or in the pool."""
    reason, code = "READER_NOT_FOUND", "NOT_FOUND"


class NoCardPresent(CardError):
    """The reader holds no card or token."""
    reason, code = "CARD_NOT_PRESENT", "FAILED_PRECONDITION"


class CardRemoved(CardError):
    """The card or token went away during the step."""
    reason, code = "CARD_REMOVED", "ABORTED"


class CardIoError(CardError):
    """Talking to the reader, token or pcscd failed."""
    reason, code = "CARD_IO", "UNAVAILABLE"
    index: int | None = None        # the APDU of a script that failed, if any


class KeyNotFound(CardError):
    """No key with that id on the token."""
    reason, code = "KEY_NOT_FOUND", "NOT_FOUND"
    key_id: str | None = None


class WriteRefused(CardError):
    """The card refused to store an object."""
    reason, code = "WRITE_REFUSED", "FAILED_PRECONDITION"
    key_id: str | None = None


class UnsupportedOperation(CardError):
    """The reader cannot run this kind of step."""
    reason, code = "UNSUPPORTED_OPERATION", "UNIMPLEMENTED"


class ReaderBusy(CardError):
    """The reader is running another task."""
    reason, code = "READER_BUSY", "RESOURCE_EXHAUSTED"


class PinError(CardError):
    """Family: the card refused a PIN, or the gateway would not try one yet."""
    attempts_remaining: int | None = None   # the card's tries left; None: the card does not tell


class PinIncorrect(PinError):
    """The PIN was refused."""
    reason, code = "PIN_INCORRECT", "PERMISSION_DENIED"


class PinAttemptsThrottled(PinError):
    """The gateway did not try the PIN: wrong PINs were given for this card moments ago, and
    the next attempt waits for a growing interval (docs/limits.md, "Wrong PINs")."""
    reason, code = "PIN_THROTTLED", "RESOURCE_EXHAUSTED"
    retry_after_ms: int | None = None       # when the next attempt is accepted
    failures: int | None = None             # wrong PINs in a row on this card


class PinLocked(PinError):
    """The PIN is blocked."""
    reason, code = "PIN_LOCKED", "PERMISSION_DENIED"


class ApduError(CardError):
    """Family: one APDU of a script failed."""
    index: int                      # position of the APDU in the script


class MalformedApdu(ApduError):
    """An APDU of the script is not a valid command APDU."""
    reason, code = "APDU_MALFORMED", "INVALID_ARGUMENT"
    apdu: str | None = None         # the command, hex


class UnexpectedStatusWord(ApduError):
    """An APDU answered a status word the script did not expect."""
    reason, code = "APDU_UNEXPECTED_SW", "FAILED_PRECONDITION"
    sw: int                                         # e.g. 0x6A82
    responses: tuple[ApduResponse, ...] = ()        # the answers up to and including the failing one


# --- gateway link -----------------------------------------------------------------------

class LinkError(CardlineError):
    """Family: reaching the gateway that holds a reader."""
    gateway_id: str | None = None


class GatewayNotConnected(LinkError):
    """The gateway holding the reader is not attached."""
    reason, code = "GATEWAY_NOT_CONNECTED", "UNAVAILABLE"


class StepTimeout(LinkError):
    """The gateway did not answer the step in time."""
    reason, code = "STEP_TIMEOUT", "DEADLINE_EXCEEDED"
    step: str | None = None


class StepOutcomeMismatch(LinkError):
    """The gateway answered a step with the outcome of another kind of step (a DeleteObjects
    answered with card info): the answer is refused, never taken for the step's."""
    reason, code = "STEP_OUTCOME_MISMATCH", "INTERNAL"
    step: str | None = None
    expected: str | None = None                     # StepOutcome field, e.g. "objects_deleted"
    received: str | None = None                     # e.g. "card_info"


class OrchestratorRestarted(LinkError):
    """The orchestrator running the task or process stopped before it ended; the reconciler
    ended it (C16)."""
    reason, code = "ORCHESTRATOR_RESTARTED", "ABORTED"


# --- CA ---------------------------------------------------------------------------------

class CaError(CardlineError):
    """Family: a certificate authority and the requests sent to it."""
    request_id: str | None = None
    ca: str | None = None


class CaRefused(CaError):
    """The CA refused the request."""
    reason, code = "CA_REFUSED", "FAILED_PRECONDITION"
    serial_hex: str | None = None


class CaUnavailable(CaError):
    """The CA could not be reached."""
    reason, code = "CA_UNAVAILABLE", "UNAVAILABLE"


class CsrInvalid(CaError):
    """The request's signature or key does not match the card key."""
    reason, code = "CSR_INVALID", "FAILED_PRECONDITION"


# --- configuration ----------------------------------------------------------------------

class ConfigError(CardlineError):
    """Family: configuration, templates and encodings as written."""


class ConfigurationError(ConfigError):
    """The configuration is invalid."""
    reason, code = "CONFIGURATION", "FAILED_PRECONDITION"
    path: str | None = None


class TemplateNotFound(ConfigError):
    """No template with that name."""
    reason, code = "TEMPLATE_NOT_FOUND", "NOT_FOUND"
    template: str | None = None


class EncodingFailed(ConfigError):
    """The encoding cannot run as described."""
    reason, code = "ENCODING_FAILED", "FAILED_PRECONDITION"


# --- requests, stored objects and their states ------------------------------------------

class InvalidArgument(CardlineError):
    """A request field is malformed."""
    reason, code = "INVALID_ARGUMENT", "INVALID_ARGUMENT"
    field: str | None = None
    limit: int | None = None        # the bound the field broke (shared/limits.py), if that is what is wrong


class WatcherTooSlow(CardlineError):
    """A watching caller fell too many events behind and was dropped (docs/limits.md)."""
    reason, code = "WATCHER_TOO_SLOW", "RESOURCE_EXHAUSTED"
    behind: int | None = None       # events it had not read


class LeaseQuotaExceeded(CardlineError):
    """The caller already holds (or waits for) as many reader leases as its quota allows."""
    reason, code = "LEASE_QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"
    quota: int | None = None                        # pool.max_leases_per_caller


class Cancelled(CardlineError):
    """The request was cancelled before it ran (a card of a cancelled order, still in the queue)."""
    reason, code = "CANCELLED", "CANCELLED"
    order_id: str | None = None


class StoreError(CardlineError):
    """Family: stored objects and the states they are in."""


class NotFound(StoreError):
    """No stored object with that id."""
    reason, code = "NOT_FOUND", "NOT_FOUND"


class AlreadyExists(StoreError):
    """An object with that identity is already stored."""
    reason, code = "ALREADY_EXISTS", "ALREADY_EXISTS"


class StateConflict(StoreError):
    """The object is not in a state that allows this."""
    reason, code = "STATE_CONFLICT", "FAILED_PRECONDITION"
    state: str | None = None
    expected_state: str | None = None


class IllegalTransition(StoreError):
    """The state graph has no such transition."""
    reason, code = "ILLEGAL_TRANSITION", "FAILED_PRECONDITION"
    graph: str | None = None
    from_state: str | None = None
    to_state: str | None = None


class UnmappedCaAction(StoreError):
    """The target state maps to no CA action; nothing was revoked."""
    reason, code = "UNMAPPED_CA_ACTION", "FAILED_PRECONDITION"
    graph: str | None = None
    from_state: str | None = None
    to_state: str | None = None


# --- authorization ----------------------------------------------------------------------

class AuthError(CardlineError):
    """Family: who the peer is and what it may call."""


class Unauthenticated(AuthError):
    """The peer's certificate is missing, unknown or revoked."""
    reason, code = "UNAUTHENTICATED", "UNAUTHENTICATED"


class PermissionDenied(AuthError):
    """The peer's certificate (its role or name) does not allow this call."""
    reason, code = "PERMISSION_DENIED", "PERMISSION_DENIED"
    role: str | None = None


def quoted(value: object, limit: int = 80) -> str:
    """VALUE as an error message quotes what a caller sent: its repr, cut to about LIMIT
    characters (with the full length said), so that no message echoes unbounded input."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def _text(value: JsonValue) -> str:
    return value if isinstance(value, str) else json.dumps(value)
