"""Transport PUKs diversified per card (shared/transport_puk.py): one key, a PUK per token
serial in the template's alphabet and length; the key file is made 0600 and never replaced."""
from __future__ import annotations

import stat

import pytest

from shared.errors import ConfigurationError, InvalidArgument
from shared.transport_puk import TransportPukRule, create_key_file, format_problem, read_key_file

KEY = bytes(range(32))


def test_two_cards_get_different_transport_puks_from_one_key():
    rule = TransportPukRule(KEY)
    first, second = rule.puk_for("a1b2c3d4e5f60001"), rule.puk_for("a1b2c3d4e5f60002")
    assert first != second
    assert rule.puk_for("a1b2c3d4e5f60001") == first                 # the same card, the same PUK
    assert len(first) == 8 and first.isdigit()


def test_another_key_gives_the_same_card_another_puk():
    assert TransportPukRule(KEY).puk_for("0001") != TransportPukRule(bytes(32)).puk_for("0001")


def test_the_puk_has_the_templates_alphabet_and_length():
    puk = TransportPukRule(KEY, alphabet="ABCDEF0123456789", length=12).puk_for("0001")
    assert len(puk) == 12 and set(puk) <= set("ABCDEF0123456789")


def test_the_derived_puks_use_the_whole_alphabet():
    rule = TransportPukRule(KEY, alphabet="0123456789", length=4)
    assert {c for n in range(200) for c in rule.puk_for(f"{n:04d}")} == set("0123456789")


@pytest.mark.parametrize("alphabet, length, words", [
    ("0", 8, "at least two"), ("0012", 8, "each once"), ("01 2", 8, "no spaces"),
    ("0123456789", 3, "at least 4"), ("0123456789", 40, "128 bits")])
def test_a_puk_shape_that_cannot_work_is_refused_with_the_reason(alphabet, length, words):
    problem = format_problem(alphabet, length)
    assert problem is not None and words in problem
    with pytest.raises(ConfigurationError, match=words):
        TransportPukRule(KEY, alphabet, length)


def test_a_transport_puk_needs_a_serial():
    with pytest.raises(InvalidArgument):
        TransportPukRule(KEY).puk_for("")


def test_key_file_is_created_0600_read_back_and_never_overwritten(tmp_path):
    path = create_key_file(tmp_path / "transport-puk.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    assert len(key) == 32
    with pytest.raises(ConfigurationError, match="never overwritten"):
        create_key_file(path)
    assert read_key_file(path) == key


@pytest.mark.parametrize("content", ["", "12345678\n", "zz" * 32 + "\n", "00" * 31 + "\n"])
def test_a_key_file_without_a_key_is_a_configuration_error_naming_it(tmp_path, content):
    path = tmp_path / "k"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=str(path)) as caught:
        read_key_file(path)
    assert "12345678" not in caught.value.message


def test_a_card_template_with_a_puk_shape_that_cannot_work_is_refused_at_its_line():
    from orchestrator.domain.templates import read_templates

    text = ("card_templates:\n  - name: Card\n    state_graph: G\n    encoding: e\n    produced_state: A\n"
            "    failed_state: F\n    transport_puk_key_file: k.key\n    transport_puk_length: 40\n")
    [violation] = read_templates(text, "t.yaml").violations
    assert (violation.line, violation.field_path) == (8, "card_templates[0].transport_puk_length")
    assert "128 bits" in violation.message
    [card] = read_templates(text.replace(": 40", ": 6"), "t.yaml").cards
    assert (card.transport_puk_key_file, card.transport_puk_length, card.transport_puk_alphabet) == ("k.key", 6,
                                                                                                    "0123456789")
