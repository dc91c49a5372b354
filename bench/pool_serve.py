"""The in-memory reader pool's own cost under B4's load, this tree ÷ another revision.

One process per run, no gateway processes, no store: a ReaderPool with N gateways of one
PKCS#11 token each (N = CARDLINE_BENCH_B4_STATIONS, default 50), one order of N x
CARDLINE_BENCH_B4_CARDS_PER_STATION cards queued at once under one LeaseScope (one selector,
one `accepts` refusing cards already done, as orders.py does), two subscribers (the order
service and a WatchReaders stream). Each card: the reader is granted, the card task learns its
id (first step, answered at once), the lease is released, then the operator swaps the token
(new reader announced, old one removed, as bench/stations.py's operator does). The figure is
the CPU seconds of the whole order.

The two sides - this tree and REV (default `main`, exported with `git archive`) - run in turns
in processes of their own (A, B, A, B, ... after one untimed warm-up each, bench/common.py);
the printed ratio is the median of REV ÷ the median of this tree (above 1: this tree is
cheaper).

    .venv/bin/python bench/pool_serve.py [--against REV] [--rounds N]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import ROOT, interleaved, say, size


async def _order(stations: int, per_station: int) -> tuple[float, int]:
    """CPU seconds of one order through a fresh pool, and the reader events published."""
    from orchestrator.services.pool import LEASE_SCOPE, GatewaySession, LeaseScope, ReaderPool, ReaderSelector
    from shared import cards

    def token(station: int, generation: int) -> cards.Reader:
        return cards.Reader(f"slot-{generation}", cards.ReaderKind.PKCS11, f"token {station}", card_present=True,
                            token_serial=f"s{station}-{generation}")

    pool = ReaderPool()
    events = [0]

    def count(kind: str, pooled: object) -> None:
        events[0] += 1

    pool.subscribe(count)
    pool.subscribe(count)
    sessions = [GatewaySession(gateway_id=f"gw{i:03d}", site="hq", labels={"line": "1"},
                               readers={"slot-0": token(i, 0)}) for i in range(stations)]

    async def answer(session: GatewaySession) -> None:     # the gateway: every step answered at once
        while True:
            command = await session.outbox.get()
            if GatewaySession.is_close_marker(command):
                return
            session.resolve(command.command_id, session.readers[command.reader_id])

    answering = [asyncio.create_task(answer(s)) for s in sessions]
    for s in sessions:
        pool.attach(s)
    done: set[str] = set()
    generation = dict.fromkeys((s.gateway_id for s in sessions), 0)

    async def card(number: int) -> None:
        lease = await pool.acquire(ReaderSelector())
        await lease.run(cards.Step(cards.ReadCardInfo()), task_id=f"card-{number}", step_number=1, timeout_s=5.0)
        done.add(lease.reader.token_serial)
        session, old = lease.session, lease.reader
        lease.release()
        station = int(session.gateway_id[2:])
        generation[session.gateway_id] += 1
        pool.reader_event(session, "reader_added", token(station, generation[session.gateway_id]))
        pool.reader_event(session, "reader_removed", old)

    LEASE_SCOPE.set(LeaseScope(selector=ReaderSelector(site="hq"),
                               accepts=lambda gid, reader: reader.token_serial not in done))
    start = time.process_time()
    await asyncio.gather(*(card(n) for n in range(stations * per_station)))
    elapsed = time.process_time() - start
    for s in sessions:
        pool.detach(s)
    await asyncio.gather(*answering)
    return elapsed, events[0]


def _run_once() -> None:
    from shared.logging import configure as configure_logging

    configure_logging(level="WARNING")
    stations = size("CARDLINE_BENCH_B4_STATIONS", 50)
    seconds, events = asyncio.run(_order(stations, size("CARDLINE_BENCH_B4_CARDS_PER_STATION", 4)))
    print(json.dumps({"cpu_s": seconds, "events": events}))


def _side(source: pathlib.Path, results: list[dict]) -> None:
    env = dict(os.environ, PYTHONPATH=str(source))
    out = subprocess.run([sys.executable, str(source / "bench" / "pool_serve.py"), "--run-once"], env=env,
                         cwd=source, check=True, capture_output=True, text=True).stdout
    results.append(json.loads(out.strip().splitlines()[-1]))


def measure(against: str, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cardline-pool-serve-") as tmp:
        base = pathlib.Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", against], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        # The baseline runs THIS script (its own may not exist there) on ITS pool.
        (base / "bench" / "pool_serve.py").write_bytes(pathlib.Path(__file__).read_bytes())
        sides: dict[str, list[dict]] = {"this": [], against: []}
        interleaved({"this": lambda: _side(ROOT, sides["this"]), against: lambda: _side(base, sides[against])},
                    rounds)
    # Each side's own CPU time for the order (the first run is the warm-up: left out).
    cpu = {name: sorted(r["cpu_s"] for r in runs[1:])[len(runs[1:]) // 2] for name, runs in sides.items()}
    return {"pool_order_cpu_s_this": round(cpu["this"], 3), f"pool_order_cpu_s_{against}": round(cpu[against], 3),
            "pool_ratio": round(cpu[against] / cpu["this"], 2),
            "events_this": sides["this"][-1]["events"], f"events_{against}": sides[against][-1]["events"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="main", help="the revision to compare with (default main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_once:
        _run_once()
        return
    figures = measure(args.against, args.rounds)
    say(json.dumps(figures))


if __name__ == "__main__":
    main()
