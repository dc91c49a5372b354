"""What the client commands print: serials as openssl shows them (and read in any form),
tables whose ids are never cut, one JSON shape with zero values included."""
from __future__ import annotations

import pytest

from orchestrator.cli.client import as_json, print_table
from shared.errors import InvalidArgument
from shared.proto import card_service_pb2 as card_pb
from shared.serials import parse_serial, show_serial, stored_hex


def test_serials_shown_with_leading_zeros_and_colons():
    assert show_serial("db63f") == "0D:B6:3F"            # openssl x509 -serial: 0DB63F
    assert show_serial("7f") == "7F"
    assert show_serial("") == ""


@pytest.mark.parametrize("text", ["0D:B6:3F", "0d:b6:3f", "0DB63F", "db63f", "serial=0DB63F", "0x0db63f",
                                  " 0d b6 3f "])
def test_serials_accepted_in_every_form_openssl_or_cardline_prints(text):
    assert parse_serial(text) == 0xDB63F
    assert stored_hex(text) == "db63f"


def test_a_serial_that_is_not_hex_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="'0D:G6' is not a certificate serial number"):
        parse_serial("0D:G6")


def test_tables_keep_full_ids_without_a_terminal(capsys):
    ids = [f"{n:08d}-aaaa-bbbb-cccc-{n:012d}" for n in range(3)]
    print_table("id", "subject", "issuer", "template", "state",
                rows=[(i, "CN=" + "x" * 60, "CN=Some Long Issuing CA Name,O=Example", "EmployeeAuthentication",
                       "[red]Active[/]") for i in ids])
    out = capsys.readouterr().out
    for i in ids:
        assert i in out                                    # whole, on one line: copy-paste works
    assert "[red]Active[/]" in out                         # values are text, never rich markup
    assert "…" not in out


def test_json_includes_zero_values_and_enum_names():
    shown = as_json(card_pb.Task(id="t1"))
    assert shown["state"] == "TASK_STATE_UNSPECIFIED" and shown["card_id"] == "" and shown["certificate_ids"] == []


def test_enum_labels_and_their_inverse():
    from orchestrator.cli.client import enum_value, label
    from shared.cli import CliFail

    assert label(card_pb.TaskState, card_pb.TASK_STATE_SUCCEEDED) == "succeeded"
    assert enum_value(card_pb.TaskState, "succeeded", "--state") == card_pb.TASK_STATE_SUCCEEDED
    assert enum_value(card_pb.TaskState, "", "--state") == card_pb.TASK_STATE_UNSPECIFIED
    with pytest.raises(CliFail, match="--state 'done': expected one of failed, running, succeeded"):
        enum_value(card_pb.TaskState, "done", "--state")
