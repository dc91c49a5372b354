"""Small helpers every benchmark shares: side-by-side timing and sizes from the environment."""
from __future__ import annotations

import os
import pathlib
import signal
import statistics
import sys
import time
from collections.abc import Callable

from shared.logging import configure as configure_logging

ROOT = pathlib.Path(__file__).resolve().parent.parent


def size(name: str, default: int) -> int:
    """A size a run may shrink or grow with the environment variable NAME (smoke tests do)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a whole number") from None
    if value < 1:
        raise SystemExit(f"{name}={raw!r}: expected at least 1")
    return value


def interleaved(arms: dict[str, Callable[[], object]], rounds: int,
                after: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median seconds of each arm, run in turn (A, B, A, B, ...) ROUNDS times after one
    untimed warm-up each, so the machine's noise hits every arm alike. AFTER[name], when
    given, runs untimed after each run of that arm (cleaning up)."""
    after = after or {}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for timed in (False, *([True] * rounds)):
        for name, arm in arms.items():
            t0 = time.perf_counter()
            arm()
            if timed:
                times[name].append(time.perf_counter() - t0)
            if name in after:
                after[name]()
    return {name: statistics.median(t) for name, t in times.items()}


def say(text: str) -> None:
    print(text, flush=True)


def log_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def prepare_bench_process() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `with` stops the processes it started; this
    process logs warnings only, to stderr (stdout is for the figures)."""
    configure_logging(level="WARNING")
    def _raise(_signum, _frame) -> None:
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, _raise)
