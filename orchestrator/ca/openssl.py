"""OpenSslCa: a CaConnector that drives a real `openssl ca` installation (index.txt database).

Every CA operation runs the `openssl` command line (genpkey, req, ca, crl); Python only writes
the per-request extension file, reads index.txt and newcerts/, and - because `openssl ca`
cannot do it - turns a certificateHold line of index.txt back into a valid one (lift_hold).

Directory layout (created on first use when the directory holds no CA yet):

    openssl.cnf             written by the connector at every start (dir = this directory);
                            [ca] default_ca, database, new_certs_dir, serial, crlnumber,
                            policy (every DN field optional, the DN is preserved),
                            copy_extensions = none, unique_subject = no.
    index.txt               openssl's certificate database (V/R/E lines).
    index.txt.attr          unique_subject = no.
    serial, crlnumber       openssl's counters (hex). The first serial is random (64 bits).
    newcerts/<SERIAL>.pem   every issued certificate, named by openssl (uppercase hex).
    private/ca-key.pem      EC P-256 CA key, PKCS#8 encrypted (AES-256) - never plain on disk.
    ca-cert.pem             the self-signed CA certificate.
    requests/<sha256(request_id)>.json
                            the connector's journal: request_id -> serial and certificate,
                            written atomically after openssl answered.
    ca.lock                 flock()ed around every openssl run and every index.txt read/edit.
    tmp/                    CSR, extension file and output of one openssl run.
    discarded/              newcerts/ files of killed runs that hold no certificate of this CA
                            (cut short), set aside by the recovery.

The key's passphrase is not in the directory: passphrase_file (or the file
CARDLINE_CA_PASSPHRASE_FILE names; e.g. a docker secret) outside it, created with a random
passphrase (0600) on first use if missing (base.passphrase_file_of).

Idempotency (C16). Before openssl is called, the connector looks for a certificate already
issued for the request: first in requests/, then in index.txt + newcerts/ for a certificate
carrying the request's tag - a non-critical extension REQUEST_TAG_OID whose value is the
OCTET STRING sha256(request_id). The tag makes the certificate itself the record, so a crash
between openssl writing index.txt and the connector writing its journal loses nothing:
find_issued() and issue() find the certificate by its tag and repair the journal.
With tag_requests=False (a CA whose certificates must carry no private extension) the
fallback is the public key: a valid certificate for the CSR's key that no journal entry
claims is taken as this request's (a retry carries the same CSR, hence the same key).

Concurrency: a threading.Lock plus an flock on ca.lock; the lock file descriptor is passed
to each openssl child, so a child that outlives a killed orchestrator still holds the lock
until it has finished writing. Whatever an openssl run killed at any instruction leaves
(index.txt missing between its renames, .new files with or without .old, a serial behind the
index, a newcerts/ file without its index line) is rolled forward or back when the directory
is opened and whenever the lock is taken and leftovers are found (_recover_directory; each
repair logged and kept in `repairs`). Running `openssl ca` by hand on the directory while cardline runs is safe only
under the same lock: `flock ca.lock openssl ca -config openssl.cnf ...`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from orchestrator.ca.base import (
    EXTENDED_KEY_USAGES,
    IssueProfile,
    checked_request,
    der_length,
    passphrase_file_of,
    revocation_reason,
)
from shared.errors import CaRefused, CaUnavailable, ConfigurationError, InvalidArgument
from shared.files import write_atomic
from shared.logging import get_logger

log = get_logger(__name__)

# A UUID-based OID (ITU-T X.667, arc 2.25): needs no registration and collides with nothing.
REQUEST_TAG_OID = x509.ObjectIdentifier("2.25.53648542217699044370090960884446992286")
CA_VALIDITY_DAYS = 3650
CRL_DAYS = 1
OPENSSL_TIMEOUT_S = 60.0

# openssl ca -crl_reason spellings (apps/ca.c crl_reasons). RFC 5280's privilegeWithdrawn and
# aACompromise have no spelling there: index.txt cannot record them.
_OPENSSL_REASONS = {
    "unspecified": "unspecified",
    "keyCompromise": "keyCompromise",
    "cACompromise": "CACompromise",
    "affiliationChanged": "affiliationChanged",
    "superseded": "superseded",
    "cessationOfOperation": "cessationOfOperation",
    "certificateHold": "certificateHold",
}
_FROM_OPENSSL_REASON = {v.lower(): k for k, v in _OPENSSL_REASONS.items()}
# `-crl_hold INSTRUCTION` records "date,holdInstruction,INSTRUCTION": a certificateHold too.
_FROM_OPENSSL_REASON["holdinstruction"] = "certificateHold"
_HOLD_INSTRUCTIONS = ("holdInstructionNone", "holdInstructionCallIssuer", "holdInstructionReject")

# IssueProfile key usage names -> openssl's names.
_OPENSSL_KEY_USAGE = {
    "digitalSignature": "digitalSignature", "nonRepudiation": "nonRepudiation",
    "contentCommitment": "nonRepudiation", "keyEncipherment": "keyEncipherment",
    "dataEncipherment": "dataEncipherment", "keyAgreement": "keyAgreement",
    "keyCertSign": "keyCertSign", "cRLSign": "cRLSign", "encipherOnly": "encipherOnly",
    "decipherOnly": "decipherOnly",
}
# openssl's own progress chatter, left out of error messages.
_NOISE = re.compile(r"^(Using configuration from|Check that the request matches the signature|"
                    r"Signature ok|The Subject's Distinguished Name is as follows|\s+\w+\s*:)")

_CONFIG = """\
# Written by cardline (orchestrator/ca/openssl.py) at every start; edits are overwritten.
# Layout and the reasons behind each setting: docs/ca-connectors.md.
dir = {dir}

[ ca ]
default_ca = CA_default

[ CA_default ]
database          = $dir/index.txt
new_certs_dir     = $dir/newcerts
serial            = $dir/serial
crlnumber         = $dir/crlnumber
certificate       = $dir/ca-cert.pem
private_key       = $dir/private/ca-key.pem
default_md        = sha256
default_days      = 365
default_crl_days  = {crl_days}
policy            = policy_any
# The DN of the request (or of -subj) is kept as it is, field order included.
preserve          = yes
# Extensions come from the template's profile only (-extfile), never from the request.
copy_extensions   = none
# A re-issued card certificate may reuse its subject.
unique_subject    = no
crl_extensions    = crl_ext

[ policy_any ]
commonName             = optional
organizationName       = optional
organizationalUnitName = optional
countryName            = optional
emailAddress           = optional

[ crl_ext ]
authorityKeyIdentifier = keyid:always

[ req ]
distinguished_name = req_dn
prompt             = no
string_mask        = utf8only

[ req_dn ]
CN = unused

[ v3_ca ]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True)
class IndexEntry:
    """One line of index.txt."""

    status: str                 # V valid, R revoked, E expired
    expiry: str
    revocation: str             # "" or "date,reason[,hold instruction]"
    serial: int
    serial_field: str           # as openssl writes it: uppercase hex, the newcerts file name
    subject: str

    @property
    def reason(self) -> str | None:
        """The RFC 5280 name of the revocation reason, None when not revoked."""
        if self.status != "R":
            return None
        parts = self.revocation.split(",")
        if len(parts) < 2 or not parts[1]:
            return "unspecified"
        return _FROM_OPENSSL_REASON.get(parts[1].lower(), parts[1])

    def line(self) -> str:
        return "\t".join((self.status, self.expiry, self.revocation, self.serial_field, "unknown",
                          self.subject)) + "\n"


@dataclass(frozen=True)
class _Issued:
    der: bytes
    spki_sha256: str
    tag: bytes | None           # sha256(request_id) from the request tag extension
    not_before: dt.datetime


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _request_tag(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


def _parse_index(text: str, path: pathlib.Path) -> list[IndexEntry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t", 5)
        if len(fields) != 6 or fields[0] not in ("V", "R", "E"):
            raise CaUnavailable(f"{path} line {number} is not an openssl index line: {line[:80]!r}")
        try:
            serial = int(fields[3], 16)
        except ValueError:
            raise CaUnavailable(f"{path} line {number}: bad serial {fields[3]!r}") from None
        entries.append(IndexEntry(fields[0], fields[1], fields[2], serial, fields[3], fields[5]))
    return entries


def _subj_argument(name: x509.Name) -> str:
    """An x509.Name as `openssl ca -subj` reads it (with -multivalue-rdn -utf8)."""
    def escape(value: str) -> str:
        return re.sub(r"([\\/+=])", r"\\\1", value)

    parts = []
    for rdn in name.rdns:
        avas = []
        for attribute in rdn:
            if not isinstance(attribute.value, str):
                raise InvalidArgument(f"subject attribute {attribute.oid.dotted_string} is not a string")
            avas.append(f"{attribute.oid.dotted_string}={escape(attribute.value)}")
        parts.append("+".join(avas))
    return "/" + "/".join(parts)


def _openssl_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ")


# The files `openssl ca` writes as X.new and then rotates: X -> X.old, X.new -> X.
_ROTATED_NEW = ("serial.new", "index.txt.new", "index.txt.attr.new", "crlnumber.new")
_ATTR = "unique_subject = no\n"


def _index_entries_or_none(path: pathlib.Path) -> list[IndexEntry] | None:
    """The lines of an index file openssl finished writing; None when missing or cut short."""
    if not path.exists():
        return None
    text = path.read_text()
    if text and not text.endswith("\n"):
        return None
    try:
        return _parse_index(text, path)
    except CaUnavailable:
        return None


def _newcert_matches(newcerts: pathlib.Path, entry: IndexEntry) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((newcerts / f"{entry.serial_field}.pem").read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    return cert.serial_number == entry.serial


def _openssl_index_time(when: dt.datetime) -> str:
    """index.txt's expiry: UTCTime before 2050, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    when = when.astimezone(dt.UTC)
    return when.strftime("%y%m%d%H%M%SZ" if when.year < 2050 else "%Y%m%d%H%M%SZ")


def _recover_directory(directory: pathlib.Path, oneline_subject, ca_signed) -> list[str]:
    """Brings an `openssl ca` directory back to a state openssl itself would leave, from any
    instruction at which an openssl run can be killed; what it did, in words.

    An issuing run writes serial.new, index.txt.new, index.txt.attr.new, newcerts/<SERIAL>.pem
    (in that order), then renames serial -> serial.old, serial.new -> serial, index.txt ->
    index.txt.old, index.txt.new -> index.txt, index.txt.attr -> .old, .attr.new -> .attr
    (apps/ca.c save_serial, save_index, rotate_serial, rotate_index); a revocation only the
    index files, a CRL only crlnumber. The run is committed once index.txt.new is complete and
    every certificate it adds is in newcerts/: then it is rolled forward, else back. OSError
    is the caller's to report."""
    repairs: list[str] = []
    index, index_new, index_old = (directory / n for n in ("index.txt", "index.txt.new", "index.txt.old"))
    newcerts = directory / "newcerts"

    # 1. index.txt: the commit decision.
    current = _index_entries_or_none(index)
    if index.exists() and current is None:
        raise CaUnavailable(f"{index} is not an openssl index (cut short or damaged); restore it from "
                            f"{index_old} or a backup", path=str(index))
    pending = _index_entries_or_none(index_new)
    commit = False
    if index_new.exists():
        if current is None:                          # killed between index.txt -> .old and .new -> index.txt
            commit = pending is not None
        elif pending is not None:
            added = [e for e in pending if e.serial not in {c.serial for c in current}]
            commit = ({c.serial for c in current} <= {e.serial for e in pending}
                      and all(_newcert_matches(newcerts, e) for e in added))
        if commit:
            if current is not None:
                os.replace(index, index_old)
            os.replace(index_new, index)
            current = pending
            repairs.append("completed an interrupted openssl run: index.txt.new became index.txt")
        else:
            index_new.unlink()
            repairs.append("undid an interrupted openssl run: removed an unfinished index.txt.new")
    if current is None:                              # no index.txt and nothing to roll forward
        restored = _index_entries_or_none(index_old)
        if restored is None and any(newcerts.glob("*.pem")):
            raise CaUnavailable(f"{index} is missing and neither index.txt.new nor index.txt.old can "
                                f"replace it; restore it from a backup", path=str(index))
        if restored is not None:
            shutil.copy2(index_old, index)
            repairs.append("index.txt was missing: restored from index.txt.old")
        current = restored or []
        if restored is None and (directory / "ca-cert.pem").exists():
            write_atomic(index, b"")
            repairs.append("index.txt was missing in a CA without certificates: created empty")

    # 2. The files that go with the index: attributes and serial follow its decision.
    attr, attr_new = directory / "index.txt.attr", directory / "index.txt.attr.new"
    if attr_new.exists():
        if not attr.exists() or commit:
            if attr.exists():
                os.replace(attr, attr.with_name("index.txt.attr.old"))
            write_atomic(attr, _ATTR.encode())       # cardline's CAs always say exactly this
            attr_new.unlink()
            repairs.append("completed the rotation of index.txt.attr")
        else:
            attr_new.unlink()
            repairs.append("removed an unfinished index.txt.attr.new")
    serial, serial_new = directory / "serial", directory / "serial.new"
    if serial_new.exists():
        if not serial.exists():                      # killed between serial -> .old and .new -> serial
            os.replace(serial_new, serial)
            repairs.append("completed the rotation of serial")
        elif commit:
            os.replace(serial, serial.with_name("serial.old"))
            os.replace(serial_new, serial)
            repairs.append("completed the rotation of serial with its index")
        else:
            serial_new.unlink()
            repairs.append("removed serial.new of an undone run")
    crlnumber, crlnumber_new = directory / "crlnumber", directory / "crlnumber.new"
    if crlnumber_new.exists():
        if re.fullmatch(r"[0-9A-Fa-f]+\n", crlnumber_new.read_text()):   # a skipped CRL number does no harm
            if crlnumber.exists():
                os.replace(crlnumber, crlnumber.with_name("crlnumber.old"))
            os.replace(crlnumber_new, crlnumber)
            repairs.append("completed the rotation of crlnumber")
        else:
            crlnumber_new.unlink()
            repairs.append("removed an unfinished crlnumber.new")
    crlnumber_old = crlnumber.with_name("crlnumber.old")
    if not crlnumber.exists() and crlnumber_old.exists():
        number = int(crlnumber_old.read_text().strip() or "0", 16) + 1     # never a number used twice
        write_atomic(crlnumber, f"{number:04X}\n".encode())
        repairs.append(f"crlnumber was missing: set to {number:04X} after crlnumber.old")

    # 3. newcerts/ files without their index line: a certificate this CA signed is recorded
    #    (it exists, so the store must be able to learn of it); anything else is set aside.
    listed = {e.serial_field for e in current}
    added_lines = []
    for pem in sorted(newcerts.glob("*.pem")):
        if pem.stem in listed:
            continue
        try:
            cert = x509.load_pem_x509_certificate(pem.read_bytes())
        except ValueError:
            cert = None
        if cert is not None and format(cert.serial_number, "X").rjust(len(pem.stem), "0") == pem.stem \
                and ca_signed(cert):
            entry = IndexEntry("V", _openssl_index_time(cert.not_valid_after_utc), "", cert.serial_number,
                               pem.stem, oneline_subject(pem))
            added_lines.append(entry)
            repairs.append(f"newcerts/{pem.name} had no index line: recorded as valid")
        else:
            aside = directory / "discarded"
            aside.mkdir(mode=0o700, exist_ok=True)
            os.replace(pem, aside / f"{pem.name}.{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}")
            repairs.append(f"newcerts/{pem.name} is no certificate of this CA (cut short): moved to discarded/")
    if added_lines:
        current = current + added_lines
        write_atomic(index, "".join(e.line() for e in current).encode())

    # 4. The serial counter must be past every serial used, or openssl refuses to issue.
    used = max((e.serial for e in current), default=0)
    try:
        next_serial = int(serial.read_text().strip(), 16) if serial.exists() else 0
    except ValueError:
        next_serial = 0
    if current and next_serial <= used:
        write_atomic(serial, f"{used + 1:016X}\n".encode())
        repairs.append(f"serial was behind index.txt: set to {used + 1:X}")
    elif current and next_serial > used + 1 and any(r.startswith("undid") for r in repairs):
        repairs.append(f"serial {next_serial:X} is ahead of index.txt (a serial of an undone run is skipped)")
    return repairs


class OpenSslCa:
    """A CA kept by `openssl ca` in `directory`; see the module doc for the layout."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "openssl", *,
                 openssl: str = "openssl", passphrase_file: str | os.PathLike[str] | None = None,
                 subject: str | None = None, tag_requests: bool = True,
                 hold_instruction: str | None = None, timeout_s: float = OPENSSL_TIMEOUT_S) -> None:
        if hold_instruction is not None and hold_instruction not in _HOLD_INSTRUCTIONS:
            raise ConfigurationError(f"hold_instruction must be one of {', '.join(_HOLD_INSTRUCTIONS)}, "
                                     f"got {hold_instruction!r}")
        self._name = name
        self._dir = pathlib.Path(directory).resolve()
        self._openssl = openssl
        self._tag_requests = tag_requests
        self._hold_instruction = hold_instruction
        self._timeout_s = timeout_s
        self._config = self._dir / "openssl.cnf"
        self._index = self._dir / "index.txt"
        self._newcerts = self._dir / "newcerts"
        self._requests = self._dir / "requests"
        self._tmp = self._dir / "tmp"
        self._key_path = self._dir / "private" / "ca-key.pem"
        self._cert_path = self._dir / "ca-cert.pem"
        self._passphrase = passphrase_file_of(name, self._dir, passphrase_file)
        self._thread_lock = threading.Lock()
        self._checked = False                       # the full recovery check ran since open
        self.repairs: list[str] = []                # what the last recovery check repaired
        self._cache: dict[str, _Issued] = {}        # serial_field -> parsed certificate
        try:
            for sub in (self._dir, self._newcerts, self._requests, self._tmp, self._dir / "private"):
                sub.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self._dir / "ca.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CaUnavailable(f"CA {name!r}: cannot use directory {self._dir}: {exc.strerror}") from None
        try:
            with self._locked():
                self._set_up(subject or f"CN=cardline {name} CA,O=cardline")
            self._ca_cert = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
        except OSError as exc:
            raise CaUnavailable(f"CA {name!r}: cannot set up {self._dir}: {exc.strerror or exc} "
                                f"({exc.filename or self._dir})", directory=str(self._dir)) from None

    # -- set-up ------------------------------------------------------------------------

    def _set_up(self, subject: str) -> None:
        """Creates a CA like `openssl ca` expects it, or checks the one that is there."""
        write_atomic(self._config, _CONFIG.format(dir=self._dir, crl_days=CRL_DAYS).encode())
        for leftover in self._tmp.iterdir():        # of runs killed half-way; nobody else runs now
            shutil.rmtree(leftover, ignore_errors=True)
        self._run("version", check_unavailable=True)
        for path, content in ((self._index, ""), (self._dir / "index.txt.attr", "unique_subject = no\n"),
                              (self._dir / "serial", f"{secrets.randbits(63) | 1 << 62:016X}\n"),
                              (self._dir / "crlnumber", "1000\n")):
            if not path.exists():
                write_atomic(path, content.encode())
        if not self._passphrase.exists():
            if self._key_path.exists():
                raise ConfigurationError(f"CA {self._name!r}: the key {self._key_path} exists but its "
                                         f"passphrase file {self._passphrase} does not")
            fd = os.open(self._passphrase, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        if not self._passphrase.read_text().strip():
            raise ConfigurationError(f"CA {self._name!r}: the passphrase file {self._passphrase} is empty")
        if not self._key_path.exists():
            if self._cert_path.exists():
                raise ConfigurationError(f"CA {self._name!r}: {self._cert_path} exists but its key "
                                         f"{self._key_path} is missing")
            tmp_key = self._key_path.with_name(".ca-key.pem.tmp")
            tmp_key.unlink(missing_ok=True)
            self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-aes-256-cbc", "-pass", f"file:{self._passphrase}", "-out", str(tmp_key))
            os.chmod(tmp_key, 0o600)
            os.replace(tmp_key, self._key_path)
        head = self._key_path.read_bytes()[:200]
        if b"ENCRYPTED" not in head:
            raise ConfigurationError(f"CA {self._name!r}: {self._key_path} is not encrypted; cardline "
                                     f"keeps CA keys on disk only under a passphrase")
        try:
            self._run("pkey", "-in", str(self._key_path), "-passin", f"file:{self._passphrase}", "-noout")
        except CaRefused as exc:
            raise ConfigurationError(f"CA {self._name!r}: cannot open {self._key_path} with the passphrase "
                                     f"from {self._passphrase}: {exc.message}") from None
        if not self._cert_path.exists():
            x509.Name.from_rfc4514_string(subject)      # a clear error before openssl's
            tmp_cert = self._cert_path.with_name(".ca-cert.pem.tmp")
            self._run("req", "-new", "-x509", "-config", str(self._config), "-extensions", "v3_ca",
                      "-key", str(self._key_path), "-passin", f"file:{self._passphrase}",
                      "-subj", _subj_argument(x509.Name.from_rfc4514_string(subject)), "-multivalue-rdn",
                      "-utf8", "-days", str(CA_VALIDITY_DAYS), "-set_serial",
                      str(secrets.randbits(63) | 1 << 62), "-out", str(tmp_cert))
            os.replace(tmp_cert, self._cert_path)
        cert = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
        key_spki = self._run("pkey", "-in", str(self._key_path), "-passin", f"file:{self._passphrase}",
                             "-pubout", "-outform", "DER")
        if _spki(cert.public_key()) != key_spki:
            raise ConfigurationError(f"CA {self._name!r}: {self._cert_path} does not belong to {self._key_path}")

    # -- locking and running openssl ---------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._recover_interrupted()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _run(self, *args: str, check_unavailable: bool = False) -> bytes:
        """Runs openssl; its stdout, or CaRefused with its stderr summarised."""
        try:
            done = subprocess.run([self._openssl, *args], capture_output=True, timeout=self._timeout_s,
                                  cwd=self._dir, pass_fds=(self._lock_fd,), stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise CaUnavailable(f"CA {self._name!r}: the openssl command {self._openssl!r} is not installed") from None
        except PermissionError as exc:
            raise CaUnavailable(f"CA {self._name!r}: cannot run {self._openssl!r}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise CaUnavailable(f"CA {self._name!r}: openssl {args[0]} did not finish within "
                                f"{self._timeout_s:g} s") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in done.stderr.decode(errors="replace").splitlines()
                     if ln.strip() and not _NOISE.match(ln)]
            summary = "; ".join(lines[-4:])[:600] or f"exit status {done.returncode}"
            if check_unavailable:
                raise CaUnavailable(f"CA {self._name!r}: openssl does not run: {summary}")
            raise CaRefused(f"CA {self._name!r}: openssl {args[0]} failed: {summary}")
        return done.stdout

    def _ca(self, *args: str) -> bytes:
        return self._run("ca", "-batch", "-config", str(self._config), "-passin", f"file:{self._passphrase}",
                         *args)

    def _recover_interrupted(self) -> None:
        """Finishes or undoes what an openssl run killed half-way left behind (a quick look for
        leftovers at every lock; the full check of serial and newcerts/ at open and after one)."""
        try:
            leftovers = any(self._dir.joinpath(n).exists() for n in _ROTATED_NEW) or not self._index.exists()
            if leftovers or not self._checked:
                repairs = _recover_directory(self._dir, self._ca_oneline_subject, self._ca_signed)
                self._checked = True
                self.repairs = repairs
                for repair in repairs:
                    log.warning("openssl CA: repaired after an interrupted run", ca=self._name, repair=repair)
        except OSError as exc:
            raise CaUnavailable(f"CA {self._name!r}: cannot check {self._dir} for an interrupted openssl run: "
                                f"{exc.strerror or exc} ({exc.filename or self._dir})",
                                directory=str(self._dir)) from None

    def recover(self) -> list[str]:
        """Checks the directory for what an interrupted openssl run left (as at open) and
        repairs it; what was repaired, in words (empty: nothing to do)."""
        with self._thread_lock:
            self._checked = False
            self.repairs = []
        with self._locked():
            return list(self.repairs)

    def _ca_oneline_subject(self, pem: pathlib.Path) -> str:
        """The subject as openssl ca writes it in index.txt (X509_NAME_oneline)."""
        out = self._run("x509", "-in", str(pem), "-noout", "-subject", "-nameopt", "compat").decode().strip()
        return out.removeprefix("subject=").strip()

    def _ca_signed(self, cert: x509.Certificate) -> bool:
        ca_cert = getattr(self, "_ca_cert", None)
        if ca_cert is None and self._cert_path.exists():
            ca_cert = x509.load_pem_x509_certificate(self._cert_path.read_bytes())
        if ca_cert is None:
            return False
        try:
            cert.verify_directly_issued_by(ca_cert)
            return True
        except (ValueError, TypeError, InvalidSignature):
            return False

    # -- reading index.txt and newcerts/ -----------------------------------------------

    def _entries(self) -> list[IndexEntry]:
        try:
            return _parse_index(self._index.read_text(), self._index)
        except OSError as exc:
            raise CaUnavailable(f"CA {self._name!r}: cannot read {self._index}: {exc.strerror}") from None

    def _issued(self, entry: IndexEntry) -> _Issued:
        cached = self._cache.get(entry.serial_field)
        if cached is not None:
            return cached
        path = self._newcerts / f"{entry.serial_field}.pem"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except OSError as exc:
            raise CaUnavailable(f"CA {self._name!r}: index.txt lists {entry.serial_field} but "
                                f"{path} cannot be read: {exc.strerror}") from None
        try:
            ext = cert.extensions.get_extension_for_oid(REQUEST_TAG_OID).value
            raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""   # a private OID: unrecognized
            tag = raw[2:] if raw[:2] == b"\x04\x20" else None
        except x509.ExtensionNotFound:
            tag = None
        issued = _Issued(cert.public_bytes(serialization.Encoding.DER),
                         hashlib.sha256(_spki(cert.public_key())).hexdigest(), tag, cert.not_valid_before_utc)
        self._cache[entry.serial_field] = issued
        return issued

    def _entry(self, serial: int) -> IndexEntry:
        for entry in self._entries():
            if entry.serial == serial:
                return entry
        raise CaRefused(f"CA {self._name!r} did not issue a certificate with serial {serial:x}",
                        serial_hex=format(serial, "x"))

    def _write_index(self, entries: list[IndexEntry]) -> None:
        """index.txt replaced atomically: temp file, fsync, rename (under the lock)."""
        write_atomic(self._index, "".join(e.line() for e in entries).encode())

    # -- CaConnector -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def directory(self) -> pathlib.Path:
        return self._dir

    @property
    def confirms_request_ids(self) -> bool:
        """True when find_issued(request_id) finds every certificate issued for a request, also
        after a crash before the journal was written (request tags on). False: after such a
        crash only find_issued_for_key / issued_between find it."""
        return self._tag_requests

    @property
    def passphrase_path(self) -> pathlib.Path:
        """The file holding the CA key's passphrase (outside the CA directory)."""
        return self._passphrase

    @property
    def config_path(self) -> pathlib.Path:
        """openssl.cnf, for running `openssl ca -config ...` by hand (under the lock)."""
        return self._config

    def ca_certificate_der(self) -> bytes:
        return self._ca_cert.public_bytes(serialization.Encoding.DER)

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        csr = checked_request(csr_der, request_id)
        public_key = csr.public_key()
        spki_sha256 = hashlib.sha256(_spki(public_key)).hexdigest()
        with self._locked():
            earlier = self._find(request_id)
            if earlier is None and not self._tag_requests:
                earlier = self._unclaimed_for_key(spki_sha256)
            if earlier is not None:
                if earlier.spki_sha256 != spki_sha256:
                    raise CaRefused(f"request_id {request_id!r} was already used for a different key",
                                    request_id=request_id)
                self._journal(request_id, earlier)
                return earlier.der
            der = self._issue_with_openssl(csr, profile, request_id)
            cert = x509.load_der_x509_certificate(der)
            issued = _Issued(der, spki_sha256, _request_tag(request_id) if self._tag_requests else None,
                             cert.not_valid_before_utc)
            self._journal(request_id, issued)
            return der

    def find_issued(self, request_id: str) -> bytes | None:
        with self._locked():
            issued = self._find(request_id)
            if issued is None:
                return None
            self._journal(request_id, issued)       # repairs a journal a crash left behind
            return issued.der

    def revoke(self, serial: int, reason: str) -> None:
        revocation_reason(reason)       # unknown names refused before anything happens (C17)
        if reason == "removeFromCRL":
            return self.lift_hold(serial)
        if reason not in _OPENSSL_REASONS:
            raise CaRefused(f"openssl ca cannot record the revocation reason {reason!r} in index.txt; "
                            f"it knows {', '.join(_OPENSSL_REASONS)}", reason_name=reason)
        with self._locked():
            entry = self._entry(serial)
            if entry.status == "R":
                if entry.reason == reason:
                    return                      # a retried revocation is not an error
                if entry.reason != "certificateHold":
                    raise CaRefused(f"certificate {serial:x} is already revoked ({entry.reason})",
                                    serial_hex=format(serial, "x"))
                # A hold may become a final revocation (RFC 5280 5.3.1); openssl ca refuses to
                # revoke twice, so the index line is rewritten, dated now.
                now = dt.datetime.now(dt.UTC).strftime("%y%m%d%H%M%SZ")
                self._replace_entry(entry, IndexEntry("R", entry.expiry, f"{now},{_OPENSSL_REASONS[reason]}",
                                                      entry.serial, entry.serial_field, entry.subject))
                return
            cert_file = str(self._newcerts / f"{entry.serial_field}.pem")
            if reason == "certificateHold" and self._hold_instruction:
                self._ca("-revoke", cert_file, "-crl_hold", self._hold_instruction)
            else:
                self._ca("-revoke", cert_file, "-crl_reason", _OPENSSL_REASONS[reason])

    def lift_hold(self, serial: int) -> None:
        with self._locked():
            entry = self._entry(serial)
            if entry.reason != "certificateHold":
                raise CaRefused(f"certificate {serial:x} is not on hold ({entry.reason or 'not revoked'})",
                                serial_hex=format(serial, "x"))
            self._replace_entry(entry, IndexEntry("V", entry.expiry, "", entry.serial, entry.serial_field,
                                                  entry.subject))

    def crl_der(self) -> bytes:
        with self._locked(), tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
            pem = pathlib.Path(tmp) / "crl.pem"
            self._ca("-gencrl", "-out", str(pem))
            return self._run("crl", "-in", str(pem), "-outform", "DER")

    # -- for the reconciler ------------------------------------------------------------

    def find_issued_for_key(self, spki_der: bytes) -> list[bytes]:
        """Every certificate in index.txt (valid, revoked or expired) for this public key
        (SubjectPublicKeyInfo, DER), oldest first."""
        wanted = hashlib.sha256(spki_der).hexdigest()
        with self._locked():
            return [i.der for i in map(self._issued, self._entries()) if i.spki_sha256 == wanted]

    def issued_between(self, start: dt.datetime, end: dt.datetime) -> list[bytes]:
        """Certificates whose notBefore (set by openssl ca to the time of issuance) lies in
        [start, end). Naive datetimes are taken as UTC."""
        start, end = (t if t.tzinfo else t.replace(tzinfo=dt.UTC) for t in (start, end))
        with self._locked():
            return [i.der for i in map(self._issued, self._entries()) if start <= i.not_before < end]

    def issued_certificates(self) -> list[bytes]:
        """Every certificate index.txt lists, oldest first."""
        with self._locked():
            return [self._issued(e).der for e in self._entries()]

    def index_entries(self) -> list[IndexEntry]:
        """index.txt as openssl keeps it (status, revocation, serial, subject)."""
        with self._locked():
            return self._entries()

    # -- helpers -----------------------------------------------------------------------

    def _request_path(self, request_id: str) -> pathlib.Path:
        return self._requests / f"{hashlib.sha256(request_id.encode()).hexdigest()}.json"

    def _find(self, request_id: str) -> _Issued | None:
        """The certificate issued for request_id: from the journal, else by its tag."""
        path = self._request_path(request_id)
        if path.exists():
            record = json.loads(path.read_text())
            if record["request_id"] != request_id:   # short of a SHA-256 collision, never
                raise CaRefused(f"request record {path} belongs to {record['request_id']!r}")
            for entry in self._entries():
                if entry.serial == int(record["serial_hex"], 16):
                    return self._issued(entry)
            log.warning("openssl CA: journaled certificate missing from index.txt", ca=self._name,
                        serial_hex=record["serial_hex"])
        tag = _request_tag(request_id)
        for entry in self._entries():
            issued = self._issued(entry)
            if issued.tag == tag:
                return issued
        return None

    def _unclaimed_for_key(self, spki_sha256: str) -> _Issued | None:
        """Without tags: a valid certificate for this key that no journal entry claims."""
        claimed = {json.loads(p.read_text())["serial_hex"] for p in self._requests.glob("*.json")}
        for entry in self._entries():
            if entry.status == "V" and format(entry.serial, "x") not in claimed:
                issued = self._issued(entry)
                if issued.spki_sha256 == spki_sha256:
                    return issued
        return None

    def _journal(self, request_id: str, issued: _Issued) -> None:
        path = self._request_path(request_id)
        if path.exists():
            return
        cert = x509.load_der_x509_certificate(issued.der)
        record = {"request_id": request_id, "serial_hex": format(cert.serial_number, "x"),
                  "spki_sha256": issued.spki_sha256,
                  "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "certificate": cert.public_bytes(serialization.Encoding.PEM).decode()}
        try:
            write_atomic(path, json.dumps(record, indent=1).encode())
        except OSError as exc:
            # The certificate is in index.txt and carries its tag: find_issued still finds it.
            log.warning("openssl CA: request journal not written", ca=self._name, error=exc.strerror)

    def _replace_entry(self, old: IndexEntry, new: IndexEntry) -> None:
        entries = self._entries()
        self._write_index([new if e.serial_field == old.serial_field else e for e in entries])

    def _extensions(self, profile: IssueProfile, request_id: str, subject_empty: bool) -> str:
        lines = ["[ cardline_cert ]",
                 "basicConstraints = critical, CA:FALSE",
                 "subjectKeyIdentifier = hash",
                 "authorityKeyIdentifier = keyid"]
        if profile.key_usage:
            names = sorted({_OPENSSL_KEY_USAGE[n] for n in profile.key_usage})
            lines.append(f"keyUsage = critical, {', '.join(names)}")
        if profile.extended_key_usage:
            oids = [EXTENDED_KEY_USAGES[n].dotted_string for n in profile.extended_key_usage]
            lines.append(f"extendedKeyUsage = {', '.join(oids)}")
        san = profile.x509_subject_alt_name()
        if san is not None:
            # The profile's names, DER-encoded (openssl's arbitrary-extension form, so otherName
            # UPNs pass as they are); RFC 5280 4.2.1.6: critical when the subject is empty.
            lines.append(f"subjectAltName = {'critical, ' if subject_empty else ''}"
                         f"DER:{san.public_bytes().hex()}")
        if self._tag_requests:
            tag = _request_tag(request_id)
            octet_string = b"\x04" + der_length(len(tag)) + tag
            lines.append(f"{REQUEST_TAG_OID.dotted_string} = DER:{octet_string.hex()}")
        return "\n".join(lines) + "\n"

    def _issue_with_openssl(self, csr: x509.CertificateSigningRequest, profile: IssueProfile,
                            request_id: str) -> bytes:
        # Exactly the profile's subject (-subj) and extensions (-extfile; copy_extensions = none):
        # nothing of the request but its key.
        subject = profile.x509_subject()
        ext = self._extensions(profile, request_id, subject_empty=not subject.rdns)
        args = ["-extfile", "ext.cnf", "-extensions", "cardline_cert", "-notext", "-preserveDN",
                "-in", "req.pem", "-out", "cert.pem", "-subj", _subj_argument(subject), "-multivalue-rdn", "-utf8"]
        now = dt.datetime.now(dt.UTC)
        if now + dt.timedelta(days=profile.validity_days) > self._ca_cert.not_valid_after_utc:
            args += ["-enddate", _openssl_time(self._ca_cert.not_valid_after_utc)]   # never outlive the CA
        else:
            args += ["-days", str(profile.validity_days)]
        with tempfile.TemporaryDirectory(dir=self._tmp) as tmp:
            work = pathlib.Path(tmp)
            (work / "req.pem").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
            (work / "ext.cnf").write_text(ext)
            self._ca(*[str(work / a) if a in ("ext.cnf", "req.pem", "cert.pem") else a for a in args])
            try:
                cert = x509.load_pem_x509_certificate((work / "cert.pem").read_bytes())
            except (OSError, ValueError) as exc:
                raise CaRefused(f"CA {self._name!r}: openssl ca wrote no certificate: {exc}",
                                request_id=request_id) from None
        if _spki(cert.public_key()) != _spki(csr.public_key()):
            raise CaRefused(f"CA {self._name!r}: openssl issued a certificate for another key",
                            request_id=request_id)
        if cert.subject != subject:
            raise CaRefused(f"CA {self._name!r}: openssl issued the subject {cert.subject.rfc4514_string()!r}, "
                            f"not {subject.rfc4514_string()!r}", request_id=request_id)
        log.info("openssl CA issued", ca=self._name, serial_hex=format(cert.serial_number, "x"),
                 request_id=request_id)
        return cert.public_bytes(serialization.Encoding.DER)
