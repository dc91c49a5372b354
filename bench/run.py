"""`make bench`: the whole benchmark suite of issue 13, each figure a ratio measured side by
side in one run. Prints each figure as it comes and, as its LAST line, one JSON object with
the keys B1, B2, B3, B4, B5, B6_cpu, B6_rss_mb, B7 (and extra keys: the medians behind each
ratio, transactions per card, sizes). A figure that cannot be measured here is null with a
sibling key `<figure>_note` saying why; so is one whose measurement failed (the note says
how). bench/README.md describes every figure and its target.

Sizes come from the environment (defaults in brackets): CARDLINE_BENCH_B1_RUNS [15],
CARDLINE_BENCH_B2_ROUNDS [15], CARDLINE_BENCH_B4_STATIONS [50],
CARDLINE_BENCH_B4_CARDS_PER_STATION [4], CARDLINE_BENCH_B4_ROUNDS [3],
CARDLINE_BENCH_B4_KEYGEN_S [1.0], CARDLINE_BENCH_B5_ROWS [1000000],
CARDLINE_BENCH_B5_ISSUED [100], CARDLINE_BENCH_B5_ROUNDS [30], CARDLINE_BENCH_B6_LINKS [1000],
CARDLINE_BENCH_B6_WINDOW_S [30]; CARDLINE_BENCH_ONLY=B1,B5 runs only those parts.

    .venv/bin/python bench/run.py
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import apdu_relay, overhead, replicas, search, stations
from bench.common import log_to_stderr, prepare_bench_process, say, size


def parts(work: pathlib.Path) -> dict[str, tuple[tuple[str, ...], Callable[[], dict]]]:
    """Each part: the figures it yields (null when it fails) and how to measure them."""
    return {
        "B1": (("B1",), lambda: overhead.measure(work / "b1", size("CARDLINE_BENCH_B1_RUNS", 15))),
        "B2": (("B2", "B3"), lambda: apdu_relay.measure(work / "b2", size("CARDLINE_BENCH_B2_ROUNDS", 15))),
        "B4": (("B4",), lambda: stations.measure_b4(work / "b4")),
        "B5": (("B5",), search.measure),
        "B6": (("B6_cpu", "B6_rss_mb"), lambda: stations.measure_b6(work / "b6")),
        "B7": (("B7",), lambda: replicas.measure_b7(work / "b7")),
    }


def main() -> None:
    prepare_bench_process()
    only = {p.strip().upper() for p in os.environ.get("CARDLINE_BENCH_ONLY", "").split(",") if p.strip()}
    work = pathlib.Path(tempfile.mkdtemp(prefix="cardline-bench-"))
    failed = False
    figures: dict[str, object] = {}
    say(f"cardline bench: {os.cpu_count()} CPUs; working in {work}")
    # A busy machine (other jobs) squeezes the ratios towards 1 where both sides share a
    # resource (B1: the token's disk): its load is part of the result.
    load_before = os.getloadavg()[0]
    try:
        for name, (keys, measure) in parts(work).items():
            if only and name not in only:
                figures.update({k: None for k in keys})
                figures.update({f"{k}_note": "not run (CARDLINE_BENCH_ONLY)" for k in keys})
                continue
            say(f"{name}: measuring ...")
            t0 = time.monotonic()
            try:
                result = measure()
            except Exception as exc:                 # one broken part must not hide the others
                log_to_stderr(traceback.format_exc())
                failed = True
                result = {k: None for k in keys}
                result.update({f"{k}_note": f"measurement failed: {type(exc).__name__}: {exc}" for k in keys})
            for key, value in result.items():
                say(f"  {key}: {value}")
            say(f"  ({time.monotonic() - t0:.0f} s)")
            figures.update(result)
    finally:
        if failed:                                   # the processes' logs tell why
            say(f"a measurement failed: its logs are kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    figures["machine_cpus"] = os.cpu_count()
    figures["machine_load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]     # at start, at end
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
