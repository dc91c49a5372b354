"""B7 — two orchestrator replicas ÷ one, cards per second with the B4 stations, on PostgreSQL.

Both arms run side by side, each on a PostgreSQL database of its own, with the simulated
stations of B4 (bench/stations.py: the real link protocol, key generation in real-card time):

    one   one orchestrator; all N stations (default 50) linked to it; one order of
          N x cards_per_station cards
    two   two replicas on one database sharing the built-in CA and the key-encryption key
          (docs/ca-connectors.md, "Replicas on one database"); N/2 stations linked to each, enrolled at a site of that
          replica's; at the same moment one order per replica for the cards of its site

A round runs the one-arm order, then the two-arm orders (interleaved, one untimed warm-up
round first); the figure is the median two-arm rate ÷ the median one-arm rate. Each replica
produces for the stations linked to it: the work for a reader goes to the replica holding
its gateway's link, so the figure is what a second replica adds when the first is the limit.

    .venv/bin/python bench/replicas.py
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import launch
from bench.common import prepare_bench_process, say, size
from bench.search import empty_database, postgres_admin
from bench.stations import StationFleet, bench_config, fleet, run_order, wait_for_readers
from orchestrator.ca.base import PASSPHRASE_ENV
from tests.support.api import OrchestratorApi
from tests.support.processes import channel

SITES = ("b7-a", "b7-b")           # one per replica of the two-replica arm


def _concurrent_orders(orders: list[tuple[OrchestratorApi, int, str, str]], stations: StationFleet) -> float:
    """Runs ORDERS (api, cards, label, site) at the same moment, one thread each; seconds until
    the last one finished. The first failure is raised."""
    failures: list[BaseException] = []

    def one(api: OrchestratorApi, cards: int, label: str, site: str) -> None:
        try:
            run_order(api, stations, cards, label, site)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
    threads = [threading.Thread(target=one, args=o) for o in orders]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return time.perf_counter() - t0


def measure_b7(work: pathlib.Path) -> dict:
    stations = size("CARDLINE_BENCH_B4_STATIONS", 50)
    per_station = size("CARDLINE_BENCH_B4_CARDS_PER_STATION", 4)
    rounds = size("CARDLINE_BENCH_B4_ROUNDS", 3)
    keygen_s = float(os.environ.get("CARDLINE_BENCH_B4_KEYGEN_S", "1.0"))
    if stations < 2:
        raise SystemExit("B7: CARDLINE_BENCH_B4_STATIONS must be at least 2 (half of them per replica)")
    halves = (stations // 2, stations - stations // 2)
    config = bench_config(work)
    with postgres_admin() as admin, empty_database(admin, "b7_one") as one_url, \
            empty_database(admin, "b7_two") as two_url:
        # Each CA's passphrase file named here (an earlier part may have set the variable).
        env_one = {**os.environ, "CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(config),
                   "CARDLINE_ORCHESTRATOR_DATABASE_URL": one_url, PASSPHRASE_ENV: str(work / "one-ca-passphrase")}
        env_a = {**env_one, "CARDLINE_ORCHESTRATOR_DATABASE_URL": two_url,
                 PASSPHRASE_ENV: str(work / "two-a-ca-passphrase")}
        with fleet(work) as simulated, \
                launch.orchestrator(work / "one", env_one) as (one, _one), \
                launch.orchestrator(work / "two-a", env_a) as (a, _a):
            # The second replica shares the first's built-in CA and KEK (one deployment).
            env_b = {**env_a,
                     "CARDLINE_ORCHESTRATOR_CAS": json.dumps([{"name": "local", "kind": "local",
                                                               "directory": str(work / "two-a" / "ca")}]),
                     "CARDLINE_ORCHESTRATOR_KEY_ARCHIVE__FILE_PATH": str(work / "two-a" / "kek.key")}
            with launch.orchestrator(work / "two-b", env_b) as (b, _b):
                simulated.connect(one, "b7-one", stations, keygen_s, site="hq")
                simulated.connect(a, "b7-a", halves[0], keygen_s, site=SITES[0])
                simulated.connect(b, "b7-b", halves[1], keygen_s, site=SITES[1])
                wait_for_readers(one, stations, 60)
                wait_for_readers(a, halves[0], 60)
                wait_for_readers(b, halves[1], 60)
                apis = {"one": OrchestratorApi.on(channel(one)), "a": OrchestratorApi.on(channel(a)),
                        "b": OrchestratorApi.on(channel(b))}
                rates: dict[str, list[float]] = {"one": [], "two": []}
                for timed in (False, *([True] * rounds)):      # an untimed warm-up round first
                    elapsed = _concurrent_orders([(apis["one"], stations * per_station, "one", "")], simulated)
                    if timed:
                        rates["one"].append(stations * per_station / elapsed)
                    elapsed = _concurrent_orders(
                        [(apis["a"], halves[0] * per_station, "replica a", SITES[0]),
                         (apis["b"], halves[1] * per_station, "replica b", SITES[1])], simulated)
                    if timed:
                        rates["two"].append(stations * per_station / elapsed)
    one_rate, two_rate = statistics.median(rates["one"]), statistics.median(rates["two"])
    return {
        "B7": round(two_rate / one_rate, 3),
        "B7_cards_per_s_one_replica": round(one_rate, 2),
        "B7_cards_per_s_two_replicas": round(two_rate, 2),
        "B7_stations": stations,
    }


def main() -> None:
    prepare_bench_process()
    with tempfile.TemporaryDirectory(prefix="cardline-bench-b7-") as work:
        result = measure_b7(pathlib.Path(work))
    for key, value in result.items():
        say(f"{key}: {value}")


if __name__ == "__main__":
    main()
