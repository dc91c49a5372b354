"""B4 and B6 — one orchestrator process and many stations, simulated.

The stations are `SimulatedStation`s (bench-only): tests/support/fake_gateway.py's fake
gateway speaking the real link protocol over mutual TLS, each with one in-memory token, whose
key generation takes real-card time (`keygen_s`, default 1 s, awaited without blocking the
other stations). They all run on one event loop in a thread of the bench process
(`StationFleet`); the orchestrators are processes of their own (bench/launch.py).

B4: cards per second with N stations (default 50) ÷ N × the rate of one station. Two
orchestrators run side by side, one with a single station and one with N; each round runs an
order of `cards_per_station` cards per station on one, then on the other (interleaved,
median of the rounds). A card is the B1 card: two EC P-256 key pairs generated on the token,
two certificates from the local CA, written back (process bench-produce, below).

B6: one orchestrator holding N idle links (default 1,000): its CPU in % of one core over a
window (default 30 s, from /proc/PID/stat) and its resident memory in MB (/proc/PID/status)
at the end of the window, the stations answering heartbeats at the default interval.

    .venv/bin/python bench/stations.py b4|b6
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import launch  # noqa: E402
from bench.common import ROOT, say, size  # noqa: E402
from shared.proto import common_pb2, link_pb2  # noqa: E402
from shared.proto import order_service_pb2 as order_pb  # noqa: E402
from tests.support.api import OrchestratorApi  # noqa: E402
from tests.support.fake_gateway import FakeGateway, FakeToken  # noqa: E402
from tests.support.processes import channel, wait_for_pooled_reader  # noqa: E402

T = TypeVar("T")
PIN = "1234"
CONNECTS_AT_ONCE = 50                 # TLS handshakes in flight while a fleet dials in

BENCH_ENCODING = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=

[Description]
PIN=USER_PIN

[Application_A]
GenerateKeyPair=EC_P256
CertificateTemplate=EmployeeAuthentication
KeyLabel=Authentication

[Application_B]
GenerateKeyPair=EC_P256
CertificateTemplate=EmployeeSignature
KeyLabel=Signature
"""
BENCH_CARD_TEMPLATE = """
  - name: BenchCard
    state_graph: EmployeeCard
    encoding: bench-card
    produced_state: Active
    failed_state: ProductionFailed
"""
# reissue: every round produces again on the same tokens (docs/lifecycle.md).
BENCH_PROCESS = """\
name: bench-produce
inputs: [person, pin]
secret_inputs: [pin]
tasks:
  - type: card_production
    card_template: BenchCard
    reader: {kind: pkcs11}
    subject: "CN=${person},O=cardline bench"
    fields:
      USER_PIN: "${pin}"
    card: "${card}"
    reissue: true
"""


def bench_config(work: pathlib.Path) -> pathlib.Path:
    """examples/ plus the bench card (two EC P-256 keys) and its process."""
    target = work / "config"
    shutil.copytree(ROOT / "examples", target)
    (target / "encodings" / "bench-card.ini").write_text(BENCH_ENCODING)
    with open(target / "templates" / "templates.yaml", "a") as f:
        f.write(BENCH_CARD_TEMPLATE)
    (target / "processes" / "bench-produce.yaml").write_text(BENCH_PROCESS)
    return target


class SimulatedStation(FakeGateway):
    """Bench-only simulated station: the fake gateway's link and token, but commands are
    answered concurrently and a key generation first waits KEYGEN_S, as a real card does.
    `swap_card()` is its operator taking the produced card out and putting a blank one in
    (an order puts one person on one card: docs/lifecycle.md)."""

    def __init__(self, gateway_id: str, keygen_s: float) -> None:
        super().__init__(gateway_id, (FakeToken(label=gateway_id),))
        self.keygen_s = keygen_s
        self._answering: set[asyncio.Task] = set()

    async def _incoming(self, call) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            kind = msg.WhichOneof("message")
            if kind == "heartbeat":
                self._outbox.put_nowait(link_pb2.GatewayMessage(heartbeat=link_pb2.Heartbeat(
                    sequence=msg.heartbeat.sequence)))
            elif kind == "command":
                task = asyncio.create_task(self._answer_in_card_time(msg.command))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)

    async def _answer_in_card_time(self, command: link_pb2.Command) -> None:
        if command.step.WhichOneof("operation") == "generate_key_pair":
            await asyncio.sleep(self.keygen_s)
        self._outbox.put_nowait(link_pb2.GatewayMessage(step_result=self._answer(command)))
        self.commands.clear()          # the fake's record for assertions would only grow here
        self._results.clear()          # no step is resent to a live link in a bench run

    def swap_card(self, reader_id: str) -> None:
        """The card in READER_ID out (a `removed` event), a blank one in (`inserted`)."""
        done = self.tokens.pop(reader_id, None)
        if done is not None:
            done.lose()
            self.insert(FakeToken(label=self.gateway_id))


class StationFleet:
    """Simulated stations on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="station-fleet", daemon=True)
        self._thread.start()
        self.stations: list[SimulatedStation] = []
        self._by_id: dict[str, SimulatedStation] = {}

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def connect(self, address: str, prefix: str, count: int, keygen_s: float) -> None:
        """COUNT stations PREFIX-0001... dialling ADDRESS; returns once every one is welcomed."""
        stations = [SimulatedStation(f"{prefix}-{i:04d}", keygen_s) for i in range(1, count + 1)]
        # Their certificates first (files in the throwaway PKI), outside the loop.
        for station in stations:
            launch.default_pki().gateway(station.gateway_id)

        async def dial_all() -> None:
            gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

            async def dial(station: SimulatedStation) -> None:
                async with gate:
                    await station.connect(address)
            await asyncio.gather(*(dial(s) for s in stations))
        self.stations += stations
        self._by_id.update((s.gateway_id, s) for s in stations)
        self.run(dial_all(), timeout_s=60 + count * 0.5)

    def swap_card(self, gateway_id: str, reader_id: str) -> None:
        station = self._by_id[gateway_id]
        self.loop.call_soon_threadsafe(station.swap_card, reader_id)

    def close(self) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(s.close() for s in self.stations), return_exceptions=True)
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:                           # the links' request iterators
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            self.run(close_all(), timeout_s=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def fleet() -> Iterator[StationFleet]:
    stations = StationFleet()
    try:
        yield stations
    finally:
        stations.close()


def wait_for_readers(address: str, count: int, timeout_s: float) -> None:
    """Until the orchestrator's pool lists COUNT readers."""
    readers: list = []

    def enough(r) -> bool:
        readers.append(r)
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readers.clear()
        with contextlib.suppress(TimeoutError):
            wait_for_pooled_reader(address, enough, timeout_s=0.01)
        if len(readers) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address}: {len(readers)} of {count} station readers in the pool after {timeout_s} s")


FINISHED = (order_pb.ORDER_CARD_STATE_SUCCEEDED, order_pb.ORDER_CARD_STATE_FAILED)


def run_order(api: OrchestratorApi, stations: StationFleet, cards: int, label: str) -> float:
    """Seconds from CreateOrder to the last card done; every card must succeed. Watching the
    order like an operator, each finished card is swapped for a blank one at once."""
    swapped: set[int] = set()
    t0 = time.perf_counter()
    order = api.orders.CreateOrder(order_pb.CreateOrderRequest(
        process="bench-produce", secret_inputs={"pin": PIN},
        items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text=f"Bench {label} {i}")})
               for i in range(cards)])).order
    for event in api.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order.id)):
        order = event.order
        for card in order.cards:
            if card.state in FINISHED and card.index not in swapped:
                swapped.add(card.index)
                stations.swap_card(card.gateway_id, card.reader_id)
    elapsed = time.perf_counter() - t0
    failed = [c for c in order.cards if c.state != order_pb.ORDER_CARD_STATE_SUCCEEDED]
    if failed:
        raise RuntimeError(f"B4: {len(failed)} of {cards} cards failed in the {label} order, "
                           f"first: {failed[0].error}")
    return elapsed


def measure_b4(work: pathlib.Path) -> dict:
    stations = size("CARDLINE_BENCH_B4_STATIONS", 50)
    per_station = size("CARDLINE_BENCH_B4_CARDS_PER_STATION", 4)
    rounds = size("CARDLINE_BENCH_B4_ROUNDS", 3)
    keygen_s = float(os.environ.get("CARDLINE_BENCH_B4_KEYGEN_S", "1.0"))
    env = {**os.environ, "CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(bench_config(work))}
    with fleet() as simulated, \
            launch.orchestrator(work / "orchestrator-one", env) as (one, _p1), \
            launch.orchestrator(work / "orchestrator-many", env) as (many, _p2):
        simulated.connect(one, "bench-one", 1, keygen_s)
        simulated.connect(many, "bench-many", stations, keygen_s)
        wait_for_readers(one, 1, 30)
        wait_for_readers(many, stations, 60)
        apis = {"one": OrchestratorApi.on(channel(one)), "many": OrchestratorApi.on(channel(many))}
        cards = {"one": per_station, "many": per_station * stations}
        rates: dict[str, list[float]] = {"one": [], "many": []}
        for timed in (False, *([True] * rounds)):        # an untimed warm-up round first
            for side in ("one", "many"):
                elapsed = run_order(apis[side], simulated, cards[side], side)
                if timed:
                    rates[side].append(cards[side] / elapsed)
    one_rate, many_rate = statistics.median(rates["one"]), statistics.median(rates["many"])
    return {
        "B4": round(many_rate / (stations * one_rate), 3),
        "B4_cards_per_s_one_station": round(one_rate, 3),
        "B4_cards_per_s_many_stations": round(many_rate, 2),
        "B4_stations": stations,
        "B4_keygen_s": keygen_s,
    }


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")       # utime + stime


def _rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def measure_b6(work: pathlib.Path) -> dict:
    links = size("CARDLINE_BENCH_B6_LINKS", 1000)
    window_s = size("CARDLINE_BENCH_B6_WINDOW_S", 30)
    with fleet() as simulated, launch.orchestrator(work / "orchestrator-idle") as (address, proc):
        simulated.connect(address, "bench-idle", links, keygen_s=1.0)
        wait_for_readers(address, links, 120)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(window_s)                            # the measurement window itself
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        rss = _rss_mb(proc.pid)
        wait_for_readers(address, links, 10)            # every link still held at the end
    return {
        "B6_cpu": round((cpu1 - cpu0) / (t1 - t0) * 100, 2),
        "B6_rss_mb": round(rss, 1),
        "B6_links": links,
        "B6_window_s": window_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("figure", choices=["b4", "b6"])
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"cardline-bench-{args.figure}-"))
    result = (measure_b4 if args.figure == "b4" else measure_b6)(work)
    for key, value in result.items():
        say(f"{key}: {value}")


if __name__ == "__main__":
    main()
