"""The fake token keeps the promises the rule tests rely on: real proofs of possession, PINs
checked, certificates only next to their own key, lost cards stay lost."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.services.card_tasks import check_proof_of_possession
from shared import cards
from shared.errors import CardRemoved, CsrInvalid, PinIncorrect, WriteRefused
from tests.support.fake_gateway import FakeToken


def generate(token: FakeToken, key_type=cards.KeyType.EC_P256) -> cards.GeneratedKey:
    generated = token.run(cards.Step(cards.GenerateKeyPair(key_type, "k", os.urandom(8), "CN=t"), user_pin="1234"))
    assert isinstance(generated, cards.GeneratedKey)
    return generated


def self_signed(private_key) -> bytes:
    name = x509.Name.from_rfc4514_string("CN=t")
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private_key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(private_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize("key_type", [cards.KeyType.EC_P256, cards.KeyType.RSA_2048])
def test_fake_token_request_carries_a_real_proof_of_possession(key_type):
    generated = generate(FakeToken(), key_type)
    check_proof_of_possession(generated)                     # the orchestrator's own check
    other = generate(FakeToken())
    with pytest.raises(CsrInvalid):
        check_proof_of_possession(dataclasses.replace(generated, csr_der=other.csr_der))


def test_fake_token_checks_pins():
    token = FakeToken()
    with pytest.raises(PinIncorrect):
        token.run(cards.Step(cards.ListObjects(), user_pin="0000"))
    with pytest.raises(PinIncorrect):
        token.run(cards.Step(cards.SetPins(new_user_pin="1111"), so_pin="wrong"))
    token.run(cards.Step(cards.SetPins(new_user_pin="1111"), so_pin="12345678"))
    assert token.user_pin == "1111"


def test_fake_token_stores_a_certificate_only_next_to_its_own_key():
    token = FakeToken()
    generated = generate(token)
    foreign = self_signed(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(WriteRefused):
        token.run(cards.Step(cards.WriteCertificates((cards.CertificateObject(generated.key_id, "c", foreign),)),
                             user_pin="1234"))
    assert token.certificates == {}


def test_fake_token_once_lost_answers_card_removed():
    token = FakeToken()
    token.lose()
    with pytest.raises(CardRemoved):
        token.run(cards.Step(cards.ReadCardInfo()))
    assert token.reader().card_present is False
