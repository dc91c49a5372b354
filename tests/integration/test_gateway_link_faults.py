"""The gateway when things break under it (issue: crash gaps): a SoftHSM2 token whose object
store was cut to 0 bytes (SoftHSM2 rewrites token.object in place; a gateway killed mid-write
leaves that) is reported as a reader in state ERROR with the reason instead of silently
dropping out of the pool; and the link to the orchestrator shuts down cleanly when the
orchestrator's whole process group is killed and when the gateway stops - no asyncio
traceback in the gateway's log.

Real parts: `cardline orchestrator serve` and `cardline gateway serve` processes, SoftHSM2 in
a token directory of this test's own (so the broken token disturbs no other test)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.integration.test_c16_crash_consistency import Station
from tests.support import softhsm as softhsm_setup
from tests.support.replicas import pooled_readers
from tests.support.softhsm import SoftHsmToken

pytestmark = pytest.mark.hardware


def _private_token(tmp_path, softhsm_module: str, label: str) -> SoftHsmToken:
    conf = softhsm_setup.make_softhsm_dir(tmp_path / "softhsm")
    serial = softhsm_setup.init_token(conf, label, "12345678", "1234")
    return SoftHsmToken(module_path=softhsm_module, conf_path=conf, label=label, serial=serial,
                        slot_id=softhsm_setup.token_slot_id(conf, serial), so_pin="12345678", user_pin="1234")


def _wait_for(what: str, predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def _gateway_log(station: Station) -> str:
    return (station.gateway_dir / "gateway.log").read_text()


def test_unreadable_token_is_a_reader_in_error_and_the_link_shuts_down_cleanly(tmp_path, softhsm_module):
    good = _private_token(tmp_path, softhsm_module, "good-token")
    broken_serial = softhsm_setup.init_token(good.conf_path, "broken-token", "12345678", "1234")
    [broken_dir] = [p for p in (tmp_path / "softhsm").rglob("token.object")
                    if p.parent.name.replace("-", "").endswith(broken_serial)]
    broken_dir.write_bytes(b"")                      # cut short while SoftHSM2 rewrote it

    station = Station(tmp_path / "station", good)
    try:
        station.start_orchestrator()
        station.start_gateway()                      # waits for the good token's reader
        broken = _wait_for("the broken token's reader", lambda: [
            r for r in pooled_readers(station.address, insecure=True) if r.reader.token_serial == broken_serial])
        [reader] = broken
        assert reader.state == pool_pb.POOLED_READER_STATE_ERROR
        assert "empty (0 bytes)" in reader.reader.error and str(broken_dir) in reader.reader.error
        assert not reader.reader.card_present

        # The orchestrator's whole process group dies; the gateway's link drops and redials.
        assert station.orchestrator is not None and station.gateway is not None
        os.killpg(station.orchestrator.pid, signal.SIGKILL)
        station.orchestrator.wait(10)
        _wait_for("the gateway noticing", lambda: "orchestrator link down" in _gateway_log(station))
        station.start_orchestrator()
        station.reader_id()                          # the gateway attached again
        assert [r.state for r in pooled_readers(station.address, insecure=True)
                if r.reader.token_serial == broken_serial] == [pool_pb.POOLED_READER_STATE_ERROR]
        station.gateway.send_signal(signal.SIGTERM)
        assert station.gateway.wait(15) == 0
    finally:
        station.stop()
    log = _gateway_log(station)
    assert "asynchronous generator is already running" not in log and "Task was destroyed" not in log
    assert "Traceback" not in log, log[-3000:]
