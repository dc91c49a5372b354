"""The error catalogue: every failure cardline reports has a stable reason and a gRPC code.

Code raises a subclass of CardlineError; servicers turn it into a gRPC status carrying a
google.rpc.ErrorInfo (reason, domain, metadata), and step results on the gateway link carry
the same reason in common.v1.Error. Clients match on `reason`, never on message text.

`code` is the name of a gRPC status code; this module imports no grpc so that domain code
may raise these errors (shared/rpc.py maps the name to grpc.StatusCode).
"""
from __future__ import annotations

DOMAIN = "cardline"


class CardlineError(Exception):
    reason: str = "INTERNAL"
    code: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def _error(name: str, reason: str, code: str, doc: str) -> type[CardlineError]:
    cls = type(name, (CardlineError,), {"reason": reason, "code": code, "__doc__": doc})
    CATALOGUE[reason] = cls
    return cls


CATALOGUE: dict[str, type[CardlineError]] = {"INTERNAL": CardlineError}

InvalidArgument = _error("InvalidArgument", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "A request field is malformed.")
ReaderNotFound = _error("ReaderNotFound", "READER_NOT_FOUND", "NOT_FOUND", "No such reader on the gateway or in the pool.")
NoCardPresent = _error("NoCardPresent", "CARD_NOT_PRESENT", "FAILED_PRECONDITION", "The reader holds no card or token.")
CardRemoved = _error("CardRemoved", "CARD_REMOVED", "ABORTED", "The card or token went away during the step.")
PinIncorrect = _error("PinIncorrect", "PIN_INCORRECT", "PERMISSION_DENIED", "The PIN was refused (metadata: attempts_remaining when known).")
PinLocked = _error("PinLocked", "PIN_LOCKED", "PERMISSION_DENIED", "The PIN is blocked.")
KeyNotFound = _error("KeyNotFound", "KEY_NOT_FOUND", "NOT_FOUND", "No key with that id on the token.")
MalformedApdu = _error("MalformedApdu", "APDU_MALFORMED", "INVALID_ARGUMENT", "An APDU of the script is not a valid command APDU.")
UnexpectedStatusWord = _error("UnexpectedStatusWord", "APDU_UNEXPECTED_SW", "FAILED_PRECONDITION", "An APDU answered a status word the script did not expect (metadata: index, sw).")
CardIoError = _error("CardIoError", "CARD_IO", "UNAVAILABLE", "Talking to the reader, token or pcscd failed.")
WriteRefused = _error("WriteRefused", "WRITE_REFUSED", "FAILED_PRECONDITION", "The card refused to store an object.")
UnsupportedOperation = _error("UnsupportedOperation", "UNSUPPORTED_OPERATION", "UNIMPLEMENTED", "The reader cannot run this kind of step.")
GatewayNotConnected = _error("GatewayNotConnected", "GATEWAY_NOT_CONNECTED", "UNAVAILABLE", "The gateway holding the reader is not attached.")
ReaderBusy = _error("ReaderBusy", "READER_BUSY", "RESOURCE_EXHAUSTED", "The reader is running another task.")
StepTimeout = _error("StepTimeout", "STEP_TIMEOUT", "DEADLINE_EXCEEDED", "The gateway did not answer the step in time.")
OrchestratorRestarted = _error("OrchestratorRestarted", "ORCHESTRATOR_RESTARTED", "ABORTED", "The orchestrator running the task or process stopped before it ended; the reconciler ended it (C16).")
CaRefused = _error("CaRefused", "CA_REFUSED", "FAILED_PRECONDITION", "The CA refused the request.")
CaUnavailable = _error("CaUnavailable", "CA_UNAVAILABLE", "UNAVAILABLE", "The CA could not be reached.")
CsrInvalid = _error("CsrInvalid", "CSR_INVALID", "FAILED_PRECONDITION", "The request's signature or key does not match the card key.")
NotFound = _error("NotFound", "NOT_FOUND", "NOT_FOUND", "No stored object with that id.")
TemplateNotFound = _error("TemplateNotFound", "TEMPLATE_NOT_FOUND", "NOT_FOUND", "No template with that name.")
ConfigurationError = _error("ConfigurationError", "CONFIGURATION", "FAILED_PRECONDITION", "The configuration is invalid.")
AlreadyExists = _error("AlreadyExists", "ALREADY_EXISTS", "ALREADY_EXISTS", "An object with that identity is already stored.")
StateConflict = _error("StateConflict", "STATE_CONFLICT", "FAILED_PRECONDITION", "The object is not in a state that allows this.")
IllegalTransition = _error("IllegalTransition", "ILLEGAL_TRANSITION", "FAILED_PRECONDITION", "The state graph has no such transition.")
UnmappedCaAction = _error("UnmappedCaAction", "UNMAPPED_CA_ACTION", "FAILED_PRECONDITION", "The target state maps to no CA action; nothing was revoked.")
EncodingFailed = _error("EncodingFailed", "ENCODING_FAILED", "FAILED_PRECONDITION", "The encoding cannot run as described.")
Cancelled = _error("Cancelled", "CANCELLED", "CANCELLED", "The request was cancelled before it ran (a card of a cancelled order, still in the queue).")
Unauthenticated = _error("Unauthenticated", "UNAUTHENTICATED", "UNAUTHENTICATED", "The peer's certificate is missing, unknown or revoked.")
PermissionDenied = _error("PermissionDenied", "PERMISSION_DENIED", "PERMISSION_DENIED", "The peer's certificate (its role or name) does not allow this call.")


def from_reason(reason: str, message: str, metadata: dict[str, str] | None = None) -> CardlineError:
    """Rebuilds the exception a remote side reported (step results, gRPC status details)."""
    return CATALOGUE.get(reason, CardlineError)(message, **(metadata or {}))
