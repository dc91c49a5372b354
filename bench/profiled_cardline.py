"""`cardline` under the yappi profiler, for finding where a benchmark's time goes (bench-only).

CARDLINE_BENCH_PROFILE=DIR makes bench/launch.py start orchestrators and gateways through
this wrapper; each writes DIR/<role>-<pid>.pstats (CPU time of every thread, pstats format,
read it with `python -m pstats`) when it exits, and every CARDLINE_BENCH_PROFILE_SAVE_S seconds (default 10,
0: never) while it runs: saving stalls the process a moment. Needs `pip install yappi` in .venv; the
product never imports it.
"""
from __future__ import annotations

import importlib
import os
import pathlib
import runpy
import signal
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

PROFILE_ENV = "CARDLINE_BENCH_PROFILE"


def main() -> None:
    yappi = importlib.import_module("yappi")     # bench-only: pip install yappi

    out = pathlib.Path(os.environ[PROFILE_ENV])
    out.mkdir(parents=True, exist_ok=True)
    role = sys.argv[2] if len(sys.argv) > 2 else "cardline"
    target = sys.argv[1]                 # the script to run: bench/counted_cardline.py or the cli
    sys.argv = sys.argv[1:]
    yappi.set_clock_type(os.environ.get("CARDLINE_BENCH_PROFILE_CLOCK", "cpu"))
    path = str(out / f"{role}-{os.getpid()}.pstats")

    def save_every(seconds: float) -> None:
        # Also while it runs: a process stopped by SIGKILL (a slow shutdown) leaves its last save.
        while True:
            time.sleep(seconds)
            yappi.get_func_stats().save(path, type="pstat")

    # SIGUSR1 forgets what was counted so far: a benchmark sends it where its window starts.
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: yappi.clear_stats())
    yappi.start(builtins=False)
    every_s = float(os.environ.get("CARDLINE_BENCH_PROFILE_SAVE_S", "10"))   # 0: only at exit
    if every_s > 0:
        threading.Thread(target=save_every, args=(every_s,), daemon=True, name="profile-save").start()
    try:
        runpy.run_path(target, run_name="__main__")
    finally:
        yappi.stop()
        yappi.get_func_stats().save(path, type="pstat")


if __name__ == "__main__":
    main()
