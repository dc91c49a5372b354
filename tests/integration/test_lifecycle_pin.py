"""PIN change and unblock on real SoftHSM2 tokens (docs/lifecycle.md): the shipped
`change-pin` and `unblock-pin` processes through a gateway process, the card's own PUK kept
sealed by the orchestrator.

SoftHSM2 has no PIN retry counter: a wrong PIN is refused as often as it is tried and the PIN
never blocks, and the token tells no number of attempts left (PinIncorrect.attempts_remaining
stays None). So here a "blocked" PIN is one the holder no longer knows: wrong PINs are
refused, `unblock-pin` resets it with the PUK from the orchestrator, and the new PIN works.
Counting attempts down to a blocked PIN is shown on the fake gateway
(tests/rules/test_lifecycle_pin_rules.py)."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib

import pytest

from orchestrator.ca.base import PASSPHRASE_ENV
from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.services.card_tasks import task_error
from shared.errors import PinIncorrect
from tests.integration.test_process_rules import PIN, config_dir, running
from tests.support.lifecycle import add_puk_card_template, pin_works, produce_with_puk_process, reader_line, use_reader

pytestmark = pytest.mark.hardware
NEW_PIN, CARD_PUK = "97531", "card-own-puk-4711"


def _config(tmp_path, token):
    cfg = config_dir(tmp_path, encodings={"employee-card-with-puk": _ENCODING_WITH_PUK},
                     processes={"produce": produce_with_puk_process(reader_line(token))})
    add_puk_card_template(cfg)
    for name in ("change-pin", "unblock-pin"):
        use_reader(cfg, name, token)
    return cfg


_ENCODING_WITH_PUK = """\
    [Encoding]
    Type=Chip

    [Fields]
    USER_PIN=
    USER_PUK=

    [Description]
    SetPIN=true
    PIN=USER_PIN
    InitialPUK=USER_PUK

    [Application_A]
    GenerateKeyPair=EC_P256
    CertificateTemplate=EmployeeAuthentication
"""


def test_change_pin_by_the_holder_the_new_pin_works_and_the_old_one_does_not(tmp_path, softhsm_token):
    cfg = _config(tmp_path, softhsm_token)

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await orch.processes.start("produce", {"person": "Jane Doe", "pin": PIN, "puk": CARD_PUK})
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            changed = await orch.processes.start("change-pin", {"card": card, "pin": PIN, "new_pin": NEW_PIN})
            return produced, changed

    produced, changed = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    assert changed.state == "SUCCEEDED", changed.error_message
    assert set(changed.process_map) == {"card"}                  # the PINs passed through, never stored
    assert pin_works(softhsm_token, NEW_PIN) and not pin_works(softhsm_token, PIN)


def test_change_pin_with_a_wrong_pin_fails_typed_pin_incorrect_and_keeps_the_pin(tmp_path, softhsm_token):
    cfg = _config(tmp_path, softhsm_token)

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await orch.processes.start("produce", {"person": "Jane Doe", "pin": PIN, "puk": CARD_PUK})
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            changed = await orch.processes.start("change-pin", {"card": card, "pin": "000000", "new_pin": NEW_PIN})
            return changed, orch.store.tasks.list(process_instance_id=changed.id)

    changed, tasks = asyncio.run(body())
    assert changed.state == "FAILED" and changed.error_reason == "PIN_INCORRECT"
    error = task_error(tasks[0])
    assert isinstance(error, PinIncorrect)                          # typed, rebuilt from the stored task
    # SoftHSM2 keeps no retry counter, so it cannot tell how many attempts remain.
    assert error.attempts_remaining is None
    assert pin_works(softhsm_token, PIN) and not pin_works(softhsm_token, NEW_PIN)


def test_unblock_pin_uses_the_card_puk_kept_sealed_by_the_orchestrator_and_the_new_pin_works(
        tmp_path, softhsm_token):
    cfg = _config(tmp_path, softhsm_token)

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await orch.processes.start("produce", {"person": "Jane Doe", "pin": PIN, "puk": CARD_PUK})
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            sealed = orch.store.card_secrets.get(softhsm_token.serial)
            # The holder has forgotten the PIN: wrong ones are refused.
            wrong = await orch.processes.start("change-pin", {"card": card, "pin": "000000", "new_pin": "111111"})
            unblocked = await orch.processes.start("unblock-pin", {"card": card, "new_pin": NEW_PIN})
            audit = orch.store.audit.list(object_id=softhsm_token.serial)
            return produced, sealed, wrong, unblocked, audit

    produced, sealed, wrong, unblocked, audit = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    assert CARD_PUK.encode() not in sealed.sealed and sealed.kek_id          # sealed at rest, never plain
    assert [a.action for a in audit] == ["set_card_puk"] and CARD_PUK not in str(audit[0].detail)
    assert wrong.error_reason == "PIN_INCORRECT"
    assert unblocked.state == "SUCCEEDED", unblocked.error_message
    assert "new_pin" not in unblocked.process_map
    assert pin_works(softhsm_token, NEW_PIN) and not pin_works(softhsm_token, PIN)
    # The card's PUK is the one the orchestrator kept, no longer the transport PUK.
    assert pin_works(softhsm_token, CARD_PUK, so=True) and not pin_works(softhsm_token, softhsm_token.so_pin, so=True)
    log = (tmp_path / "gateway" / "gateway.log").read_text()
    assert CARD_PUK not in log and NEW_PIN not in log
    assert_no_secret_at_rest(tmp_path, {CARD_PUK, NEW_PIN, PIN, softhsm_token.so_pin}, cfg, [produced, unblocked])


def assert_no_secret_at_rest(tmp_path, secrets: set[str], cfg, instances) -> None:
    """The secret scan, extended to the per-card transport PUK (derived for the token's serial,
    softhsm_token.so_pin), its key and the CA key's passphrase file: none of them is in the
    gateway's log, the database (with its WAL), a process map or the orchestrator's
    environment; the passphrase is not in the CA directory."""
    key_hex = (cfg / "secrets" / "transport-puk.key").read_text().strip()
    passphrase = pathlib.Path(os.environ[PASSPHRASE_ENV]).read_text().strip()
    needles = {*secrets, key_hex, passphrase}
    data_dir = tmp_path / "orchestrator"
    stored = b"".join(p.read_bytes() for p in data_dir.glob("cardline.db*"))
    texts = {"gateway log": (tmp_path / "gateway" / "gateway.log").read_text(),
             "process maps": "".join(json.dumps(i.process_map) for i in instances),
             "environment": "".join(os.environ.values())}
    for secret in needles:
        assert secret.encode() not in stored, "a secret is in the database"
        for where, text in texts.items():
            assert secret not in text, f"a secret is in the {where}"
    assert not any(passphrase.encode() in p.read_bytes() for p in (data_dir / "ca").rglob("*") if p.is_file())


def test_unblock_pin_with_a_puk_set_from_a_file_by_the_admin_command(tmp_path, softhsm_token):
    """A card produced without InitialPUK keeps its factory PUK; an administrator gives it to the
    orchestrator with `cardline cards set-puk`, and unblock-pin authenticates with it."""
    from tests.support.lifecycle import cardline_cli
    cfg = _config(tmp_path, softhsm_token)
    puk = softhsm_token.so_pin                   # the factory PUK (the transport PUK for its serial)
    (tmp_path / "puk.txt").write_text(puk + "\n")

    async def body():
        async with running(tmp_path, softhsm_token, cfg) as (orch, _):
            produced = await orch.processes.start("produce", {"person": "Jane Doe", "pin": PIN, "puk": puk})
            card = CoreObjectDescriptor.from_dict(produced.process_map["card"])
            await asyncio.to_thread(orch.store.card_secrets.put, softhsm_token.serial, "other-kek", "AES-256-GCM",
                                    b"x" * 40, actor="test", action="set_card_puk")   # a stale entry to replace
            result = await asyncio.to_thread(cardline_cli, orch.address, "cards", "set-puk", "--token-serial",
                                             softhsm_token.serial, "--puk-file", str(tmp_path / "puk.txt"))
            unblocked = await orch.processes.start("unblock-pin", {"card": card, "new_pin": NEW_PIN})
            return result, unblocked

    result, unblocked = asyncio.run(body())
    assert result.returncode == 0, result.stderr
    assert puk not in result.stdout + result.stderr
    assert unblocked.state == "SUCCEEDED", unblocked.error_message
    assert pin_works(softhsm_token, NEW_PIN)


def test_pin_check_helper_tells_right_from_wrong_pins(softhsm_token):
    """The helper itself: the fixture's PINs work, others do not (so the assertions above can fail)."""
    assert pin_works(softhsm_token, softhsm_token.user_pin) and not pin_works(softhsm_token, "999999")
    assert pin_works(softhsm_token, softhsm_token.so_pin, so=True) and not pin_works(softhsm_token, "99999999", so=True)
