"""Keys held on a PKCS#11 token, seen as `cryptography` keys (used by the gateway's token
driver and the orchestrator's LocalCa on a token).

cryptography's builders (CSR, certificate, CRL) accept any instance of its private-key ABCs
and only call public_key() and sign() on it, so TokenEcKey / TokenRsaKey let the token sign
while the private key never leaves it (docs/ca-connectors.md).

Threads: python-pkcs11 modules must only be called from their one owner thread. The
adapters take `call`, a function that runs a token operation (a no-argument callable) where
it must run and returns its result - e.g. by submitting it to the owner's worker thread and
waiting. Hashing happens on the caller's thread; only the token operation goes through
`call`. Without `call` the token is called directly (the caller is already on the owner
thread, as in the gateway driver).

SoftHSM2 (and PIV/OpenPGP cards) offer only raw CKM_ECDSA: the digest is computed here and
the token signs the digest; the token's r||s is DER-encoded for X.509.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.utils import Buffer
from pkcs11 import Attribute, Mechanism, PublicKey
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature
from pkcs11.util.rsa import encode_rsa_public_key

T = TypeVar("T")
#: Runs a token signing operation where it must run (the module's owner thread) and returns its result.
TokenCall = Callable[[Callable[[], bytes]], bytes]


class TokenSigner(Protocol):
    """A private key on the token, as far as signing goes: a python-pkcs11 PrivateKey, or a
    handle that resolves the key of the current session."""

    def sign(self, data: bytes, *, mechanism: Mechanism) -> bytes: ...

# DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1), for tokens with only raw CKM_RSA_PKCS.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _direct(fn: Callable[[], T]) -> T:
    return fn()


def public_key_of(pub: PublicKey) -> PublicKeyTypes:
    """A cryptography public key from a PKCS#11 public key object (call on the owner thread)."""
    if pub[Attribute.KEY_TYPE] == P11KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(pub))
    # encode_rsa_public_key gives PKCS#1 RSAPublicKey, which load_der_public_key also accepts.
    return serialization.load_der_public_key(encode_rsa_public_key(pub))


def ecdsa_sign_digest(priv: TokenSigner, digest: bytes) -> bytes:
    """DER ECDSA signature of a digest by the token key priv (raw CKM_ECDSA; owner thread)."""
    return encode_ecdsa_signature(priv.sign(digest, mechanism=Mechanism.ECDSA))   # r||s -> DER


def ecdsa_sha256(priv: TokenSigner, data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return ecdsa_sign_digest(priv, digest.finalize())


def rsa_pkcs1_sha256(priv: TokenSigner, data: bytes) -> bytes:
    """PKCS#1 v1.5 SHA-256 signature by the token key priv (owner thread)."""
    try:
        return priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    except p11err.MechanismInvalid:
        # Some cards do only raw PKCS#1 v1.5: build the DigestInfo here.
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return priv.sign(SHA256_DIGEST_INFO + digest.finalize(), mechanism=Mechanism.RSA_PKCS)


def token_key(priv: TokenSigner, public_key: PublicKeyTypes, call: TokenCall | None = None) -> TokenEcKey | TokenRsaKey:
    """The adapter for the token private key `priv` whose public key is `public_key`."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return TokenEcKey(priv, public_key, call)
    if isinstance(public_key, rsa.RSAPublicKey):
        return TokenRsaKey(priv, public_key, call)
    raise TypeError(f"no token key adapter for {type(public_key).__name__}")


class TokenEcKey(ec.EllipticCurvePrivateKey):
    def __init__(self, priv: TokenSigner, public_key: ec.EllipticCurvePublicKey, call: TokenCall | None = None) -> None:
        self._priv = priv
        self._pub = public_key
        self._call = call or _direct

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, asym_utils.Prehashed):
            digest = bytes(data)
        else:
            h = hashes.Hash(algorithm)
            h.update(bytes(data))
            digest = h.finalize()
        priv = self._priv
        return self._call(lambda: ecdsa_sign_digest(priv, digest))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._pub.curve

    @property
    def key_size(self) -> int:
        return self._pub.key_size

    def exchange(self, *args: object) -> bytes:
        raise NotImplementedError("key agreement is not offered for token keys")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("the private key stays on the token")

    def private_bytes(self, *args: object) -> bytes:
        raise TypeError("the private key stays on the token")

    def __copy__(self) -> TokenEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenEcKey:
        return self


class TokenRsaKey(rsa.RSAPrivateKey):
    def __init__(self, priv: TokenSigner, public_key: rsa.RSAPublicKey, call: TokenCall | None = None) -> None:
        self._priv = priv
        self._pub = public_key
        self._call = call or _direct

    def sign(self, data: Buffer, pad: AsymmetricPadding,
             algorithm: asym_utils.Prehashed | hashes.HashAlgorithm | asym_utils.NoDigestInfo) -> bytes:
        if not isinstance(pad, padding.PKCS1v15) or not isinstance(algorithm, hashes.SHA256):
            raise NotImplementedError("token RSA keys sign PKCS#1 v1.5 with SHA-256 only")
        priv, data = self._priv, bytes(data)
        return self._call(lambda: rsa_pkcs1_sha256(priv, data))

    def public_key(self) -> rsa.RSAPublicKey:
        return self._pub

    @property
    def key_size(self) -> int:
        return self._pub.key_size

    def decrypt(self, *args: object) -> bytes:
        raise NotImplementedError("decryption is not offered for token keys")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TypeError("the private key stays on the token")

    def private_bytes(self, *args: object) -> bytes:
        raise TypeError("the private key stays on the token")

    def __copy__(self) -> TokenRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenRsaKey:
        return self
