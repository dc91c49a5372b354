"""docker-compose.yml starts and produces a card — without Docker: each service's command
line and environment run as a process, in the compose file's depends_on order, with the
image's default configuration (Dockerfile COPY/ENV/WORKDIR), volumes and secrets mapped to
temporary directories (tests/support/compose.py lists every edit), the files made by
deploy/compose-init.sh, and the test's PostgreSQL in place of the postgres service. Each
service must pass its healthcheck (compose's, else the Dockerfile's HEALTHCHECK) before the
next one starts, as `condition: service_healthy` asks."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy.engine import make_url

from orchestrator.store import Store
from tests.support.compose import ROOT, load_compose, parse_dockerfile, service_paths, start_order
from tests.support.processes import free_port

pytestmark = [pytest.mark.hardware, pytest.mark.postgres]

VENV_BIN = pathlib.Path(sys.executable).parent
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LISTEN_SETTING = {"orchestrator": "CARDLINE_ORCHESTRATOR_LISTEN", "gateway": "CARDLINE_GATEWAY_LISTEN"}




def wait_healthy(command: list[str], env: dict[str, str], cwd: pathlib.Path, proc: subprocess.Popen,
                 log: pathlib.Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{command}: the service exited ({proc.returncode}):\n{log.read_text()}"
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"healthcheck {command} never passed: {done.stderr}\n{log.read_text()}"
        time.sleep(0.3)     # the next healthcheck round


def test_compose_services_start_in_order_and_produce_a_card(tmp_path: pathlib.Path, postgres_store: Store,
                                                           postgres_database_url: str):
    compose, image = load_compose(), parse_dockerfile()
    compose_dir = tmp_path / "project"            # where docker-compose.yml would live: ./var/compose
    init = subprocess.run([str(ROOT / "deploy" / "compose-init.sh"), str(compose_dir / "var" / "compose")],
                          env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}, capture_output=True,
                          text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    addresses: dict[str, str] = {}
    processes: list[subprocess.Popen] = []
    try:
        for name in start_order(compose):
            service = compose["services"][name]
            if "build" not in service:      # the postgres service: the test's PostgreSQL stands in
                assert service["image"].startswith("postgres:")
                continue
            paths = service_paths(compose, name, image, compose_dir, tmp_path / "volumes",
                                  tmp_path / "run-secrets" / name)
            settings_copy = tmp_path / "settings" / f"{name}.yaml"
            settings_copy.parent.mkdir(exist_ok=True)
            image_settings = image.env["CARDLINE_CONFIG"]
            settings_copy.write_text(paths((ROOT / image.copies[image_settings]).read_text()))
            paths.add(image_settings, settings_copy)
            argv = [paths(a) for a in (service.get("entrypoint") or image.entrypoint)]
            argv += [paths(a) for a in service.get("command", [] if "entrypoint" in service else image.cmd)]
            env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
                   **{k: paths(v) for k, v in image.env.items()},
                   **{k: paths(str(v)) for k, v in service.get("environment", {}).items()}}
            env["CARDLINE_CONFIG"] = str(settings_copy)
            kind = "gateway" if any(k.startswith("CARDLINE_GATEWAY_") for k in env) else "orchestrator"
            url = env.get("CARDLINE_ORCHESTRATOR_DATABASE_URL")
            if url:         # host "postgres" of the compose network -> the test's database
                assert make_url(url).host == "postgres"
                env["CARDLINE_ORCHESTRATOR_DATABASE_URL"] = postgres_database_url
            for other, address in addresses.items():   # host names of the compose network
                env = {k: re.sub(rf"\b{re.escape(other)}:\d+\b", address, v) for k, v in env.items()}
            own = f"127.0.0.1:{free_port()}"
            env[LISTEN_SETTING[kind]] = own
            addresses[name] = own
            cwd = pathlib.Path(paths(image.workdir))
            cwd.mkdir(parents=True, exist_ok=True)
            log = tmp_path / f"{name}.log"
            with open(log, "w") as out:
                processes.append(subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, start_new_session=True))
            check = (service.get("healthcheck") or {}).get("test") or image.healthcheck
            assert check[0] in {"CMD", "/bin/sh"} or check[0] == "cardline", check
            wait_healthy([paths(a) for a in (check[1:] if check[0] == "CMD" else check)], env, cwd,
                         processes[-1], log)

        # A card, by the compose file's own instructions, through the published port.
        compose_pki = compose_dir / "var" / "compose" / "pki"
        produced = subprocess.run(
            [str(VENV_BIN / "cardline"), "--tls-dir", str(compose_pki), "process", "start", "produce-employee-card",
             "--orchestrator", addresses["orchestrator"], "-i", "person=Jane Doe", "--secrets-stdin", "--json"],
            input="pin=135790\n", capture_output=True, text=True, timeout=180)
        logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
        assert produced.returncode == 0, f"{produced.stderr}\n{logs}"
    finally:
        for proc in processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    certificates = postgres_store.certificates.list()
    assert sorted(c.template for c in certificates) == ["EmployeeAuthentication", "EmployeeSignature"]
    assert {c.state for c in certificates} == {"Active"}
    # On the token of whichever station produced it: both certificates, next to their keys.
    listings = []
    for station in ("station-1", "station-2"):
        conf = tmp_path / "volumes" / f"{station}-data" / "softhsm" / "softhsm2.conf"
        listing = subprocess.run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", station,
                                  "--list-objects"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        listings.append(listing.stdout)
    assert sorted(listing.count("Certificate Object") for listing in listings) == [0, 2], listings
