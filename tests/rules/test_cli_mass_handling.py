"""`cardline certs handle-issued` without ids (every certificate in the internal issued
state, rule C5) lists with --dry-run, asks before it acts (--yes skips), and handles exactly
the certificates it counted; `certs show` finds one by its serial as openssl prints it."""
from __future__ import annotations

import asyncio
import json

import typer
from typer.testing import CliRunner

from orchestrator.cli import register
from shared import cards
from shared.cli import CliFail
from shared.errors import WriteRefused
from shared.serials import show_serial
from tests.rules.rig import ISSUED, rule_orchestrator
from tests.support.pki import default_pki


def _cardline(address: str, *args: str):
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, [*args, "--orchestrator", address],
                                env={"CARDLINE_TLS_DIR": str(default_pki().directory)})
    if isinstance(result.exception, CliFail):
        return result.exception.code, result.stdout, result.exception.message
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, ""


def test_handle_issued_without_ids_lists_asks_and_handles_what_it_counted(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            rig.gateway.fail(WriteRefused("token full"), operation=cards.WriteCertificates)
            outcome = await rig.produce("EmployeeAuthentication")
            [cert] = rig.certificates(task_id=outcome.task.id)
            run = lambda *a: asyncio.to_thread(_cardline, rig.orch.address, *a)  # noqa: E731 - the CLI blocks
            dry = await run("certs", "handle-issued", "--dry-run", "--json")
            state_after_dry = rig.certificate(cert.id).state
            unconfirmed = await run("certs", "handle-issued", "--revoke-reason", "cessationOfOperation",
                                    "--target-state", "Revoked")
            state_unconfirmed = rig.certificate(cert.id).state
            shown = await run("certs", "show", show_serial(cert.serial_hex), "--json")
            done = await run("certs", "handle-issued", "--revoke-reason", "cessationOfOperation",
                             "--target-state", "Revoked", "--yes", "--json")
            return cert, dry, state_after_dry, unconfirmed, state_unconfirmed, shown, done, rig.certificate(cert.id)

    cert, dry, state_after_dry, unconfirmed, state_unconfirmed, shown, done, final = asyncio.run(body())
    assert dry[0] == 0 and [h["descriptor"]["id"] for h in json.loads(dry[1])] == [cert.id]
    assert state_after_dry == ISSUED                                      # a dry run changes nothing
    assert unconfirmed[0] == 2 and "--yes" in unconfirmed[2]               # no terminal to ask on
    assert state_unconfirmed == ISSUED
    assert shown[0] == 0 and json.loads(shown[1])["id"] == cert.id         # found by 0D:B6:... serial
    assert done[0] == 0 and [r["certificate_id"] for r in json.loads(done[1])] == [cert.id]
    assert final.state == "Revoked"


def test_handle_issued_sends_more_certificates_than_one_request_may_name_in_batches(tmp_path, monkeypatch):
    """A request names at most shared.limits.MAX_ITEMS ids (docs/limits.md): the CLI splits."""
    from orchestrator.cli import certificates as certificates_cli
    monkeypatch.setattr(certificates_cli, "MAX_ITEMS", 2)

    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            rig.gateway.fail(WriteRefused("token full"), operation=cards.WriteCertificates, occurrence=3)
            outcome = await rig.produce("EmployeeAuthentication", "EmployeeSignature", "EmployeeEncryption")
            left = rig.certificates(task_id=outcome.task.id)
            done = await asyncio.to_thread(_cardline, rig.orch.address, "certs", "handle-issued", "--revoke-reason",
                                           "cessationOfOperation", "--target-state", "Revoked", "--yes", "--json")
            return left, done, [rig.certificate(c.id).state for c in left]

    left, done, states = asyncio.run(body())
    assert len(left) == 3 and done[0] == 0, done
    assert sorted(r["certificate_id"] for r in json.loads(done[1])) == sorted(c.id for c in left)
    assert states == ["Revoked"] * 3
