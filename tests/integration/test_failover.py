"""Failover of clients and gateways over several orchestrators (issue 13, docs/operator-guide.md):
a gateway given two addresses attaches to the first and, when that orchestrator dies, to the
second, whose pool then holds its readers; a CLI command given two addresses, the first dead
(nobody listening, or a frozen process), is answered by the second.

Real parts: `cardline orchestrator serve` processes in process groups of their own (killed
and frozen by group), a `cardline gateway serve` process with a SoftHSM2 token, the `cardline`
CLI; mutual TLS with the session's PKI throughout. Each orchestrator has its own data
directory: this is client-side failover, not replica coordination."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, free_port, gateway_process, wait_for_pooled_reader
from tests.support.replicas import Replicas, pooled_readers

pytestmark = pytest.mark.hardware


def attached_address(metrics_address: str) -> str | None:
    """The `address` label of cardline_gateway_orchestrator_attached, None without one."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("cardline_gateway_orchestrator_attached{") and line.endswith(" 1.0"):
            return line.split('address="', 1)[1].split('"', 1)[0]
    return None


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CARDLINE, "--tls-dir", str(default_pki().directory), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_gateway_attaches_to_the_next_orchestrator_when_its_orchestrator_dies(tmp_path, softhsm_token):
    metrics = f"127.0.0.1:{free_port()}"
    with Replicas(tmp_path) as orchestrators:
        first, second = orchestrators.start_all("first", "second")
        with gateway_process(f"{first.address},{second.address}", "station-failover", tmp_path / "gateway",
                             pkcs11_module=softhsm_token.module_path,
                             env={**softhsm_token.env, "CARDLINE_GATEWAY_RECONNECT_MAX_S": "1"},
                             args=("--metrics-listen", metrics)):
            mine = lambda r: r.reader.token_label == softhsm_token.label  # noqa: E731
            wait_for_pooled_reader(first.address, mine)
            assert attached_address(metrics) == first.address
            assert not [r for r in pooled_readers(second.address) if mine(r)]    # one link, to the first

            first.kill()
            killed = time.monotonic()
            pooled = wait_for_pooled_reader(second.address, mine, timeout_s=15)
            took = time.monotonic() - killed
            assert pooled.reader.token_serial == softhsm_token.serial
            assert attached_address(metrics) == second.address
            log = (tmp_path / "gateway" / "gateway.log").read_text()
            assert "attached to orchestrator" in log and second.address in log
            print(f"gateway attached to the second orchestrator {took:.2f} s after the first was killed")


def test_cli_call_is_answered_by_the_next_orchestrator_when_nobody_listens_on_the_first(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    with Replicas(tmp_path) as orchestrators:
        live = orchestrators.start("live")
        repeated = cli("gateways", "--json", "--orchestrator", dead, "--orchestrator", live.address)
        assert repeated.returncode == 0, repeated.stderr
        assert json.loads(repeated.stdout) == []
        listed = cli("gateways", "--json", env={**os.environ, "CARDLINE_ORCHESTRATOR": f"{dead},{live.address}"})
        assert listed.returncode == 0, listed.stderr


def test_cli_call_is_answered_by_the_next_orchestrator_when_the_first_is_frozen(tmp_path):
    with Replicas(tmp_path) as orchestrators:
        frozen, live = orchestrators.start_all("frozen", "live")
        frozen.freeze()                              # accepts connections (the kernel does), answers nothing
        started = time.monotonic()
        answered = cli("--connect-timeout", "1", "gateways", "--json",
                       "--orchestrator", f"{frozen.address},{live.address}")
        took = time.monotonic() - started
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout) == []
        print(f"CLI answered by the second orchestrator {took:.2f} s after it started (first frozen)")


def test_cli_names_every_orchestrator_it_could_not_reach():
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    failed = cli("--connect-timeout", "1", "gateways", "--orchestrator", ",".join(dead))
    assert failed.returncode == 1
    assert "no orchestrator reachable" in failed.stderr
    assert all(address in failed.stderr for address in dead), failed.stderr
