"""B4 and B6 — one orchestrator process and many stations, simulated.

The stations are `SimulatedStation`s (bench-only): tests/support/fake_gateway.py's fake
gateway speaking the real link protocol over mutual TLS, each with one in-memory token, whose
key generation takes real-card time (`keygen_s`, default 1 s, awaited without blocking the
other stations). They all run on one event loop in a process of their own (`StationFleet`,
`stations.py fleet`); the orchestrators are processes of their own too (bench/launch.py).

B4: cards per second with N stations (default 50) ÷ N x the rate of one station. Two
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
import contextlib
import os
import pathlib
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import launch
from bench.common import ROOT, prepare_bench_process, say, size
from shared import convert
from shared.pki import Pki
from shared.proto import common_pb2, link_pb2, reader_pool_service_pb2_grpc
from shared.proto import order_service_pb2 as order_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support import pki as support_pki
from tests.support.api import OrchestratorApi
from tests.support.fake_gateway import FakeGateway, FakeToken
from tests.support.processes import channel

PIN = "1234"
CONNECTS_AT_ONCE = 50                 # TLS handshakes in flight while a fleet dials in
ORDER_TIMEOUT_S = 600

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
    `swap_card()` is its operator taking the produced token out and putting a blank one in
    (an order puts one person on one card: docs/lifecycle.md)."""

    SITE = "hq"

    def __init__(self, gateway_id: str, keygen_s: float, site: str = SITE) -> None:
        super().__init__(gateway_id, (FakeToken(label=gateway_id),), site=site)
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
        """As the gateway's registry reports a PKCS#11 token swapped between two scans
        (gateway/core/registry.py): the new token's reader added, then the old one removed.
        (Removed first, the order's queued cards would fail with READER_NOT_FOUND: no reader
        left that matches.)"""
        done = self.tokens.pop(reader_id, None)
        if done is None:
            return
        done.present = False
        blank = FakeToken(label=self.gateway_id)
        self.tokens[blank.reader_id] = blank
        for kind, reader in (("reader_added", blank.reader()), ("reader_removed", done.reader())):
            self._outbox.put_nowait(link_pb2.GatewayMessage(reader_event=convert.reader_event_to_proto(kind, reader)))


async def serve_fleet(commands: asyncio.Queue[str | None]) -> None:
    """The fleet process: runs COMMANDS (lines from the bench) until None (its stdin closed).
      connect ADDRESS PREFIX COUNT KEYGEN_S SITE -> COUNT stations PREFIX-0001... at SITE;
                                               answers "connected PREFIX" once every one is welcomed
      swap GATEWAY_ID READER_ID             -> that station swaps the token in that reader"""
    stations: dict[str, SimulatedStation] = {}

    async def connect(address: str, prefix: str, count: int, keygen_s: float, site: str) -> None:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
        batch = [SimulatedStation(f"{prefix}-{i:04d}", keygen_s, site) for i in range(1, count + 1)]
        stations.update((s.gateway_id, s) for s in batch)

        async def dial(station: SimulatedStation) -> None:
            async with gate:
                await station.connect(address)
        try:
            await asyncio.gather(*(dial(s) for s in batch))
            print(f"connected {prefix}", flush=True)
        except Exception as exc:
            print(f"error {prefix}: {type(exc).__name__}: {exc}", flush=True)

    pending: set[asyncio.Task] = set()
    while (line := await commands.get()) is not None:
        word, *args = line.split()
        if word == "connect":
            task = asyncio.create_task(connect(args[0], args[1], int(args[2]), float(args[3]), args[4]))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif word == "swap":
            stations[args[0]].swap_card(args[1])
    await asyncio.gather(*(s.close() for s in stations.values()), return_exceptions=True)


def fleet_main(pki_dir: str) -> None:
    """Entry of the fleet process; the stations use the bench's PKI in PKI_DIR."""
    support_pki._default = support_pki.TlsRig(Pki(pathlib.Path(pki_dir)))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str | None] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line)
            loop.call_soon_threadsafe(commands.put_nowait, None)
        threading.Thread(target=read_stdin, daemon=True).start()
        await serve_fleet(commands)
    asyncio.run(main())


class StationFleet:
    """Simulated stations in a process of their own (one asyncio loop; grpc.aio there, the
    bench's synchronous gRPC clients here: one process must not mix them)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._sending = threading.Lock()          # B7 watches two orders from two threads

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with self._sending:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def connect(self, address: str, prefix: str, count: int, keygen_s: float,
                site: str = SimulatedStation.SITE) -> None:
        """COUNT stations PREFIX-0001... at SITE dialling ADDRESS; returns once every one is
        welcomed."""
        # Their certificates first, in the bench's PKI, enrolled where the stations say they
        # stand (FakeGateway's site): one enrolled elsewhere would be revoked and issued anew,
        # and every revocation sends the new CRL down every open link.
        for i in range(1, count + 1):
            launch.default_pki().gateway(f"{prefix}-{i:04d}", site=site)
        self._send(f"connect {address} {prefix} {count} {keygen_s} {site}")
        timeout_s = 60 + count * 0.5
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        answer = self.proc.stdout.readline().strip() if ready else ""
        if answer != f"connected {prefix}":
            raise RuntimeError(f"the station fleet did not connect {count} stations {prefix} to {address} "
                               f"within {timeout_s} s: {answer or 'no answer'}")

    def swap_card(self, gateway_id: str, reader_id: str) -> None:
        self._send(f"swap {gateway_id} {reader_id}")


@contextlib.contextmanager
def fleet(work: pathlib.Path) -> Iterator[StationFleet]:
    work.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "fleet", "--pki-dir", str(launch.default_pki().directory)]
    with open(work / "fleet.log", "w") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        yield StationFleet(proc)
    finally:
        with contextlib.suppress(BrokenPipeError):
            assert proc.stdin is not None
            proc.stdin.close()                       # the fleet closes its links and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        launch.stop_group(proc)


def wait_for_readers(address: str, count: int, timeout_s: float) -> None:
    """Until the orchestrator's pool lists COUNT online readers (every page)."""
    online = 0
    deadline = time.monotonic() + timeout_s
    with channel(address) as client:
        stub = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(client)
        while time.monotonic() < deadline:
            online, token = 0, ""
            while True:
                page = stub.ListReaders(pool_pb.ListReadersRequest(page_size=1000, page_token=token), timeout=10)
                online += sum(r.state != pool_pb.POOLED_READER_STATE_OFFLINE for r in page.readers)
                if not (token := page.next_page_token):
                    break
            if online >= count:
                return
            time.sleep(0.2)
    raise TimeoutError(f"{address}: {online} of {count} station readers online in the pool after {timeout_s} s")


FINISHED = (order_pb.ORDER_CARD_STATE_SUCCEEDED, order_pb.ORDER_CARD_STATE_FAILED)


def run_order(api: OrchestratorApi, stations: StationFleet, cards: int, label: str, site: str = "") -> float:
    """Seconds from CreateOrder to the last card done; every card must succeed. Watching the
    order like an operator, each finished card is swapped for a blank one at once. SITE: the
    order takes readers of that site only."""
    swapped: set[int] = set()
    t0 = time.perf_counter()
    order = api.orders.CreateOrder(order_pb.CreateOrderRequest(
        process="bench-produce", secret_inputs={"pin": PIN}, selector=pool_pb.ReaderSelector(site=site),
        items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text=f"Bench {label} {i}")})
               for i in range(cards)])).order
    while not all(c.state in FINISHED for c in order.cards):   # a watch stream may end early: watch again
        if time.perf_counter() - t0 > ORDER_TIMEOUT_S:
            raise TimeoutError(f"B4: the {label} order of {cards} cards not finished after {ORDER_TIMEOUT_S} s")
        for event in api.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order.id),
                                           timeout=ORDER_TIMEOUT_S):
            order = event.order
            for card in order.cards:
                if card.state in FINISHED and card.index not in swapped:
                    swapped.add(card.index)
                    if card.reader_id:             # a card that failed before it got a reader used none
                        stations.swap_card(card.gateway_id, card.reader_id)
    elapsed = time.perf_counter() - t0
    failed = [c for c in order.cards if c.state != order_pb.ORDER_CARD_STATE_SUCCEEDED]
    if failed:
        first = failed[0]
        raise RuntimeError(f"B4: {len(failed)} of {cards} cards failed in the {label} order, first: card "
                           f"{first.index} {order_pb.OrderCardState.Name(first.state)} on {first.reader_id or '-'}: "
                           f"{first.error.reason} {first.error.message}")
    return elapsed


def measure_b4(work: pathlib.Path) -> dict:
    stations = size("CARDLINE_BENCH_B4_STATIONS", 50)
    per_station = size("CARDLINE_BENCH_B4_CARDS_PER_STATION", 4)
    rounds = size("CARDLINE_BENCH_B4_ROUNDS", 3)
    keygen_s = float(os.environ.get("CARDLINE_BENCH_B4_KEYGEN_S", "1.0"))
    env = {**os.environ, "CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(bench_config(work))}
    counter = launch.TransactionCounter(work / "transactions-many")
    store = launch.Transactions(0, 0)                  # of the many-side orders timed
    with fleet(work) as simulated, \
            launch.orchestrator(work / "orchestrator-one", env) as (one, _p1), \
            launch.orchestrator(work / "orchestrator-many", env, counter=counter) as (many, many_proc):
        simulated.connect(one, "bench-one", 1, keygen_s)
        simulated.connect(many, "bench-many", stations, keygen_s)
        wait_for_readers(one, 1, 30)
        wait_for_readers(many, stations, 60)
        apis = {"one": OrchestratorApi.on(channel(one)), "many": OrchestratorApi.on(channel(many))}
        cards = {"one": per_station, "many": per_station * stations}
        rates: dict[str, list[float]] = {"one": [], "many": []}
        busy = {"orchestrator": 0.0, "stations": 0.0, "elapsed": 0.0}     # CPU s while the many-side orders ran
        for timed in (False, *([True] * rounds)):        # an untimed warm-up round first
            for side in ("one", "many"):
                cpu = (_cpu_seconds(many_proc.pid), _cpu_seconds(simulated.proc.pid))
                before = counter.read()
                elapsed = run_order(apis[side], simulated, cards[side], side)
                if timed:
                    rates[side].append(cards[side] / elapsed)
                if timed and side == "many":
                    busy["orchestrator"] += _cpu_seconds(many_proc.pid) - cpu[0]
                    busy["stations"] += _cpu_seconds(simulated.proc.pid) - cpu[1]
                    busy["elapsed"] += elapsed
                    store = store + (counter.read() - before)
    one_rate, many_rate = statistics.median(rates["one"]), statistics.median(rates["many"])
    return {
        "B4": round(many_rate / (stations * one_rate), 3),
        "B4_cards_per_s_one_station": round(one_rate, 3),
        "B4_cards_per_s_many_stations": round(many_rate, 2),
        # % of one core while the many-station orders ran: near 100 %, that process is the limit
        "B4_orchestrator_cpu": round(busy["orchestrator"] / busy["elapsed"] * 100, 1),
        "B4_stations_process_cpu": round(busy["stations"] / busy["elapsed"] * 100, 1),
        "B4_transactions_per_card": round(store.total / (rounds * cards["many"]), 1),
        # waiting for SQLite's write lock, summed over the concurrent tasks
        "B4_write_lock_wait_ms_per_card": round(store.write_lock_wait_us / 1000 / (rounds * cards["many"]), 1),
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
    with fleet(work) as simulated, launch.orchestrator(work / "orchestrator-idle") as (address, proc):
        simulated.connect(address, "bench-idle", links, keygen_s=1.0)
        wait_for_readers(address, links, 120)
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        if os.environ.get(launch.PROFILE_ENV):        # profiled (bench/profiled_cardline.py): the window only
            os.kill(proc.pid, signal.SIGUSR1)
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
    prepare_bench_process()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("figure", choices=["b4", "b6", "fleet"])
    parser.add_argument("--pki-dir", help="fleet: the bench's PKI directory")
    args = parser.parse_args()
    if args.figure == "fleet":
        fleet_main(args.pki_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"cardline-bench-{args.figure}-") as work:
        result = (measure_b4 if args.figure == "b4" else measure_b6)(pathlib.Path(work))
    for key, value in result.items():
        say(f"{key}: {value}")


if __name__ == "__main__":
    main()
