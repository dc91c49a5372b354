"""A FAKE gateway for rule tests: no SoftHSM2, no pcscd, no subprocess.

`FakeGateway` dials an in-process orchestrator over the real `GatewayLink` stream
(protos/cardline/orchestrator/v1/link.proto) on 127.0.0.1 with its own gateway certificate
from the session's PKI (mutual TLS, as production), announces one PKCS#11-kind reader per
`FakeToken`, and answers the orchestrator's step commands from a dict-backed token.

Why the link and not the step relay inside the orchestrator: plugging in at
`GatewaySession.run_step` would be a few lines shorter, but it would skip the parts a rule
test should go through just as production does — the link servicer (hello, peer identity,
heartbeats, detaching), the reader pool's view of the gateway, and the protobuf conversion
of every step and every error in both directions. Speaking the frozen link contract costs one
small loop here and keeps the fake independent of the orchestrator's internals.

The token (`FakeToken`) keeps keys, certificates, data objects and PINs in dicts. Keys are
generated in memory with `cryptography`, so a certificate request carries a real proof of
possession that the orchestrator checks. What it refuses mirrors the PKCS#11 driver
(gateway/drivers/pkcs11.py): a wrong PIN (PinIncorrect), a certificate for a key it does not
hold (WriteRefused), a card that is gone (CardRemoved).

Faults, so the failure rules can be tested:
  - `fail(error, operation=..., occurrence=n | step_number=n)`: that command answers ERROR,
    nothing is done on the token;
  - `token.refuse_writes = True`: every write (certificate, key import, data object) is
    refused with WriteRefused;
  - `lose_card(operation=..., occurrence=n)` or `token.lose()` (e.g. from an orchestrator
    boundary hook): the token leaves its reader (a `removed` reader event goes up the link)
    and every later step on it answers CardRemoved;
  - `answer_with(value, operation=..., occurrence=n | step_number=n)`: that command is
    answered with VALUE, e.g. the outcome of another kind of step (a gateway replaying an
    older answer, or lying); nothing is done on the token;
  - `fall_silent()`: heartbeats go unanswered, the link stays open;
  - `FakeToken(lying_csr=LyingCsr(subject, extensions))`: a hostile station's card requests
    its own subject and extensions (subjectAltNames...) instead of the subject it was asked for,
    signed by the new key as an honest request is (docs/templates.md: ignored and audited).
Every command received is recorded in `commands` (operation, task, step) for assertions.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from shared import cards, convert
from shared.errors import (
    CardlineError,
    CardRemoved,
    InvalidArgument,
    KeyNotFound,
    PinIncorrect,
    PinLocked,
    ReaderNotFound,
    UnexpectedStatusWord,
    WriteRefused,
)
from shared.proto import link_pb2, link_pb2_grpc
from tests.support.pki import default_pki

_serials = itertools.count(1)
# What the fake generates and imports, as the PKCS#11 driver does: EC and RSA keys.
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_private_key(key_type: cards.KeyType) -> _PrivateKey:
    if key_type is cards.KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(65537, {cards.KeyType.RSA_2048: 2048, cards.KeyType.RSA_3072: 3072}[key_type])


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class FakeKey:
    label: str
    private_key: _PrivateKey = field(repr=False)
    imported: bool = False

    @property
    def public_key_der(self) -> bytes:
        return _spki(self.private_key.public_key())


@dataclass(frozen=True)
class FakeCertificate:
    label: str
    der: bytes


@dataclass(frozen=True)
class FakeDataObject:
    value: bytes
    private: bool


@dataclass(frozen=True)
class LyingCsr:
    """What a hostile station puts into every certificate request: SUBJECT (RFC 4514) instead
    of the one it was asked for, and EXTENSIONS (each added non-critical)."""
    subject: str
    extensions: tuple[x509.ExtensionType, ...] = ()


class FakeToken:
    """A PKCS#11 token kept in dicts: keys and certificates by key id, data objects by
    (application, label), a user PIN and an SO PIN (PUK)."""

    def __init__(self, serial: str | None = None, label: str = "fake-token", *, user_pin: str = "1234",
                 so_pin: str = "12345678", pin_tries: int | None = None, lying_csr: LyingCsr | None = None) -> None:
        self.serial = serial or f"FAKE{next(_serials):012d}"
        self.label = label
        self.user_pin = user_pin
        self.so_pin = so_pin
        # A user PIN retry counter like a smart card's (None: none, like SoftHSM2): each wrong
        # PIN counts down and is reported with the attempts left; at 0 the PIN is blocked until
        # it is reset with the SO PIN.
        self.pin_tries = pin_tries
        self.user_tries_left = pin_tries
        self.keys: dict[bytes, FakeKey] = {}
        self.certificates: dict[bytes, FakeCertificate] = {}
        self.data_objects: dict[tuple[str, str], FakeDataObject] = {}
        self.apdus: list[bytes] = []             # APDU script commands received, in order
        self.present = True
        self.refuse_writes = False
        self.lying_csr = lying_csr
        self._on_lost: list = []

    @property
    def reader_id(self) -> str:
        return f"fake-pkcs11:{self.serial}"

    def reader(self) -> cards.Reader:
        return cards.Reader(self.reader_id, cards.ReaderKind.PKCS11, f"Fake token {self.label}", self.present,
                            token_label=self.label if self.present else "",
                            token_serial=self.serial if self.present else "", token_model="FakeToken")

    def lose(self) -> None:
        """The token leaves its reader (pulled out, deleted): later steps answer CardRemoved."""
        if self.present:
            self.present = False
            for notify in self._on_lost:
                notify(self)

    def certificate_labels(self) -> list[str]:
        return [c.label for c in self.certificates.values()]

    # --- steps -----------------------------------------------------------------------------

    def run(self, step: cards.Step) -> cards.StepValue:
        if not self.present:
            raise CardRemoved(f"token {self.serial} is no longer in its reader", reader_id=self.reader_id)
        op = step.operation
        match op:
            case cards.ReadCardInfo():
                return self.reader()
            case cards.SetPins() if not step.so_pin:      # the holder changes the PIN (C_SetPIN as user)
                self._login(step.user_pin, self.user_pin, "user")
                self.user_pin = op.new_user_pin
                return cards.PinsSet()
            case cards.SetPins():                         # reset with the SO PIN (C_InitPIN), unblocks
                self._login(step.so_pin, self.so_pin, "SO")
                if op.new_user_pin:
                    self.user_pin, self.user_tries_left = op.new_user_pin, self.pin_tries
                self.so_pin = op.new_so_pin or self.so_pin
                return cards.PinsSet()
        self._login(step.user_pin, self.user_pin, "user")
        match op:
            case cards.GenerateKeyPair():
                return self._generate(op)
            case cards.WriteCertificates():
                return cards.WrittenCertificates(tuple(self._write_certificate(c) for c in op.certificates))
            case cards.ImportKeyPair():
                return self._import(op)
            case cards.WriteDataObject():
                self._check_writable("data object")
                self.data_objects[(op.application, op.label)] = FakeDataObject(op.value, op.private)
                return cards.DataObjectWritten(op.label)
            case cards.ListObjects():
                return cards.ObjectListing(self._listing())
            case cards.DeleteObjects():
                count = (op.key_id in self.keys) + (op.key_id in self.certificates)
                self.keys.pop(op.key_id, None)
                self.certificates.pop(op.key_id, None)
                return cards.DeletedCount(count)
            case cards.Sign():
                return cards.Signature(self._sign(op))
            case cards.RunApduScript():
                return cards.ApduScriptResult(tuple(self._apdu(i, a) for i, a in enumerate(op.apdus)))
        raise InvalidArgument(f"the fake token cannot run {type(op).__name__}")

    def _login(self, given: str, expected: str, role: str) -> None:
        counted = role == "user" and self.user_tries_left is not None
        if counted and self.user_tries_left == 0:
            raise PinLocked("the user PIN is blocked", reader_id=self.reader_id)
        if given == expected:
            if counted:
                self.user_tries_left = self.pin_tries
            return
        if not counted:
            raise PinIncorrect(f"wrong {role} PIN", reader_id=self.reader_id)
        assert self.user_tries_left is not None
        self.user_tries_left -= 1
        if self.user_tries_left == 0:
            raise PinLocked("wrong user PIN; the user PIN is now blocked", reader_id=self.reader_id)
        raise PinIncorrect("wrong user PIN", reader_id=self.reader_id, attempts_remaining=self.user_tries_left)

    def _check_writable(self, what: str) -> None:
        if self.refuse_writes:
            raise WriteRefused(f"the token refused the {what}", reader_id=self.reader_id)

    def _generate(self, op: cards.GenerateKeyPair) -> cards.GeneratedKey:
        self._check_writable("key")
        if op.key_id in self.keys:
            raise WriteRefused("a private key with this id is already on the token", key_id=op.key_id.hex())
        key = FakeKey(op.label, _new_private_key(op.key_type))
        self.keys[op.key_id] = key
        csr = b""
        if op.csr_subject:
            builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name.from_rfc4514_string(
                self.lying_csr.subject if self.lying_csr else op.csr_subject))
            for extension in self.lying_csr.extensions if self.lying_csr else ():
                builder = builder.add_extension(extension, critical=False)
            csr = builder.sign(key.private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        return cards.GeneratedKey(op.key_id, key.public_key_der, csr)

    def _write_certificate(self, c: cards.CertificateObject) -> bytes:
        self._check_writable("certificate")
        spki = _spki(x509.load_der_x509_certificate(c.certificate_der).public_key())
        key_id = c.key_id or next((kid for kid, k in self.keys.items() if k.public_key_der == spki), b"")
        key = self.keys.get(key_id)
        if key is None:
            raise WriteRefused("no key on the token matches the certificate's public key")
        if key.public_key_der != spki:
            raise WriteRefused("the certificate's public key is not this key's", key_id=key_id.hex())
        self.certificates[key_id] = FakeCertificate(c.label, c.certificate_der)
        return key_id

    def _import(self, op: cards.ImportKeyPair) -> cards.KeyPairImported:
        self._check_writable("key")
        private_key = serialization.load_der_private_key(op.private_key_der, None)
        if not isinstance(private_key, _PrivateKey):
            raise InvalidArgument(f"{type(private_key).__name__.lstrip('_')} keys cannot be imported (EC, RSA only)")
        if op.key_id in self.keys:
            raise WriteRefused("a key with this id is already on the token", key_id=op.key_id.hex())
        key = FakeKey(op.label, private_key, imported=True)
        if op.certificate_der and _spki(x509.load_der_x509_certificate(op.certificate_der).public_key()) \
                != key.public_key_der:
            raise WriteRefused("the certificate's public key is not the imported key's", key_id=op.key_id.hex())
        self.keys[op.key_id] = key
        if op.certificate_der:
            self.certificates[op.key_id] = FakeCertificate(op.label, op.certificate_der)
        return cards.KeyPairImported(op.key_id)

    def _listing(self) -> tuple[cards.StoredObject, ...]:
        found = [cards.StoredObject(cards.ObjectClass.PRIVATE_KEY, kid, k.label) for kid, k in self.keys.items()]
        found += [cards.StoredObject(cards.ObjectClass.CERTIFICATE, kid, c.label, certificate_der=c.der)
                  for kid, c in self.certificates.items()]
        found += [cards.StoredObject(cards.ObjectClass.DATA, b"", label) for _app, label in self.data_objects]
        return tuple(found)

    def _sign(self, op: cards.Sign) -> bytes:
        key = self.keys.get(op.key_id)
        if key is None:
            raise KeyNotFound("no private key with this id on the token", key_id=op.key_id.hex())
        private_key, algorithm = key.private_key, op.algorithm
        if algorithm is cards.SignatureAlgorithm.ECDSA_SHA256 and isinstance(private_key, ec.EllipticCurvePrivateKey):
            return private_key.sign(op.data, ec.ECDSA(hashes.SHA256()))
        if algorithm is cards.SignatureAlgorithm.RSA_PKCS1_SHA256 and isinstance(private_key, rsa.RSAPrivateKey):
            return private_key.sign(op.data, padding.PKCS1v15(), hashes.SHA256())
        raise InvalidArgument(f"{op.algorithm.value} does not fit the key {op.key_id.hex()}")  # as the driver

    def _apdu(self, index: int, apdu: cards.Apdu) -> cards.ApduResponse:
        """Every command answers 9000 with no data: enough to follow a script's path."""
        self.apdus.append(apdu.command)
        if not any(len(expected) == 4 and all(e in ("X", s) for e, s in zip(expected.upper(), "9000", strict=True))
                   for expected in apdu.expected_sw):
            raise UnexpectedStatusWord(f"APDU {index} answered 9000", index=str(index), sw="9000")
        return cards.ApduResponse(b"", 0x9000)


@dataclass(frozen=True)
class ReceivedCommand:
    task_id: str
    step_number: int
    operation: cards.Operation
    reader_id: str
    # The secrets the step brought: what a station sees (tests check where they go).
    user_pin: str = field(default="", repr=False)
    so_pin: str = field(default="", repr=False)


@dataclass
class _Fault:
    error: CardlineError | None           # None: lose the card instead
    operation: type | None
    step_number: int | None
    occurrence: int
    seen: int = 0
    answer: cards.StepValue | None = None     # answered instead of running the step

    def matches(self, command: ReceivedCommand) -> bool:
        if self.operation is not None and not isinstance(command.operation, self.operation):
            return False
        if self.step_number is not None and command.step_number != self.step_number:
            return False
        self.seen += 1
        return self.seen == self.occurrence


class FakeGateway:
    """One fake station: its tokens, the link to the orchestrator, the faults to play."""

    def __init__(self, gateway_id: str = "station-1", tokens: tuple[FakeToken, ...] = (), *, site: str = "hq",
                 labels: dict[str, str] | None = None, hello_labels: dict[str, str] | None = None) -> None:
        """SITE and LABELS are enrolled in its certificate and said in its hello; HELLO_LABELS,
        when given, are what its hello claims instead (a lying or oversized hello)."""
        self.gateway_id = gateway_id
        self.tokens = {t.reader_id: t for t in (tokens or (FakeToken(),))}
        self.site = site
        self.labels = labels or {}
        self.hello_labels = self.labels if hello_labels is None else hello_labels
        self.commands: list[ReceivedCommand] = []
        self._faults: list[_Fault] = []
        self._results: dict[tuple[str, int], link_pb2.StepResult] = {}   # (task, step) -> first answer
        self._outbox: asyncio.Queue[link_pb2.GatewayMessage] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._reader: asyncio.Task | None = None
        self.silent = False
        for token in self.tokens.values():
            token._on_lost.append(self._token_lost)

    @property
    def token(self) -> FakeToken:
        """The first (often only) token."""
        return next(iter(self.tokens.values()))

    # --- faults ----------------------------------------------------------------------------

    def fail(self, error: CardlineError, *, operation: type | None = None, step_number: int | None = None,
             occurrence: int = 1) -> None:
        """The OCCURRENCE-th command matching OPERATION (a shared/cards.py class) and/or
        STEP_NUMBER, counted from now, answers ERROR; the token is not touched."""
        self._faults.append(_Fault(error, operation, step_number, occurrence))

    def lose_card(self, *, operation: type | None = None, step_number: int | None = None, occurrence: int = 1) -> None:
        """The token leaves its reader just before the matching command (counted as for
        `fail`) runs; that command and every later one answer CardRemoved."""
        self._faults.append(_Fault(None, operation, step_number, occurrence))

    def answer_with(self, value: cards.StepValue, *, operation: type | None = None, step_number: int | None = None,
                    occurrence: int = 1) -> None:
        """The matching command (counted as for `fail`) is answered with VALUE, whatever its
        operation; the token is not touched."""
        self._faults.append(_Fault(None, operation, step_number, occurrence, answer=value))

    def fall_silent(self) -> None:
        """Stops answering the orchestrator's heartbeats, the link left open: a station whose
        network dropped without a FIN or RST."""
        self.silent = True

    def operations(self, kind: type | None = None) -> list[cards.Operation]:
        return [c.operation for c in self.commands if kind is None or isinstance(c.operation, kind)]

    # --- the link --------------------------------------------------------------------------

    async def connect(self, address: str, *, insecure: bool = False) -> None:
        """Dials ADDRESS, says hello with every token's reader, and returns once welcomed."""
        if insecure:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            enrolled = default_pki().gateway(self.gateway_id, site=self.site, labels=self.labels)
            self._channel = grpc.aio.secure_channel(address, enrolled.channel_credentials())
        self._outbox.put_nowait(link_pb2.GatewayMessage(hello=link_pb2.GatewayHello(
            gateway_id=self.gateway_id, site=self.site, labels=self.hello_labels, version="fake",
            readers=[convert.reader_to_proto(t.reader()) for t in self.tokens.values()])))
        call = link_pb2_grpc.GatewayLinkStub(self._channel).Connect(self._outgoing())
        first = await asyncio.wait_for(call.read(), 10)
        if not isinstance(first, link_pb2.OrchestratorMessage) or first.WhichOneof("message") != "welcome":
            raise ConnectionError(f"the orchestrator did not welcome fake gateway {self.gateway_id}: {first}")
        self._reader = asyncio.create_task(self._incoming(call))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()

    async def _outgoing(self) -> AsyncIterator[link_pb2.GatewayMessage]:
        while True:
            yield await self._outbox.get()

    async def _incoming(self, call) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            kind = msg.WhichOneof("message")
            if kind == "heartbeat" and not self.silent:   # answered, so the orchestrator never finds us silent
                self._outbox.put_nowait(link_pb2.GatewayMessage(heartbeat=link_pb2.Heartbeat(
                    sequence=msg.heartbeat.sequence)))
            elif kind == "command":
                self._outbox.put_nowait(link_pb2.GatewayMessage(step_result=self._answer(msg.command)))

    def _answer(self, command: link_pb2.Command) -> link_pb2.StepResult:
        key = (command.task_id, command.step_number)
        if key in self._results:           # a resent step is answered from its first result
            first = self._results[key]
            return link_pb2.StepResult(command_id=command.command_id, outcome=first.outcome, replayed=True)
        try:
            step = convert.step_from_proto(command.step)
            received = ReceivedCommand(command.task_id, command.step_number, step.operation, command.reader_id,
                                       step.user_pin, step.so_pin)
            self.commands.append(received)
            value = self._run(received, step)
            outcome = convert.value_to_outcome(value)
        except CardlineError as exc:
            outcome = convert.error_to_outcome(exc)
        result = link_pb2.StepResult(command_id=command.command_id, outcome=outcome)
        self._results[key] = result
        return result

    def _run(self, command: ReceivedCommand, step: cards.Step) -> cards.StepValue:
        token = self.tokens.get(command.reader_id)
        if token is None:
            raise ReaderNotFound(f"no reader {command.reader_id!r} on fake gateway {self.gateway_id}")
        for fault in self._faults:
            if fault.matches(command):
                if fault.answer is not None:
                    return fault.answer
                if fault.error is not None:
                    raise fault.error
                token.lose()
        return token.run(step)

    def insert(self, token: FakeToken) -> None:
        """Another token is plugged in (a new PKCS#11 slot): the orchestrator hears of it."""
        self.tokens[token.reader_id] = token
        token._on_lost.append(self._token_lost)
        self._outbox.put_nowait(link_pb2.GatewayMessage(
            reader_event=convert.reader_event_to_proto("inserted", token.reader())))

    def _token_lost(self, token: FakeToken) -> None:
        self._outbox.put_nowait(link_pb2.GatewayMessage(
            reader_event=convert.reader_event_to_proto("removed", token.reader())))
