"""A certificate is only requested for a request signed by the key the card generated."""
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.services.card_tasks import check_proof_of_possession as _check_proof_of_possession
from shared.cards import GeneratedKey
from shared.errors import CsrInvalid


def csr_signed_by(key) -> bytes:
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name.from_rfc4514_string("CN=x"))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_request_signed_by_the_card_key_is_accepted():
    key = ec.generate_private_key(ec.SECP256R1())
    _check_proof_of_possession(GeneratedKey(b"id", spki(key), csr_signed_by(key)))


def test_request_for_another_key_than_the_generated_one_is_refused():
    card_key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CsrInvalid, match="another key"):
        _check_proof_of_possession(GeneratedKey(b"id", spki(card_key), csr_signed_by(other)))


def test_request_with_a_broken_signature_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(csr_signed_by(key))
    der[-3] ^= 0x01                      # inside the signature value
    with pytest.raises(CsrInvalid):
        _check_proof_of_possession(GeneratedKey(b"id", spki(key), bytes(der)))


def test_garbage_instead_of_a_request_is_refused():
    with pytest.raises(CsrInvalid, match="no valid certificate request"):
        _check_proof_of_possession(GeneratedKey(b"id", b"spki", b"not a csr"))
