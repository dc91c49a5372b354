"""TEST-ONLY entry script: a cardline command (normally `gateway serve`) whose gateway SIGKILLs
its own process group around the moment a step's result is recorded in the step memo file:

    python -m tests.support.faulty_gateway --kill-after-recorded OPERATION -- gateway serve [options]
    python -m tests.support.faulty_gateway --kill-before-recorded OPERATION -- gateway serve [options]

after: the first step of OPERATION (e.g. GenerateKeyPair) ran on the card and its result is
committed to DATA_DIR/step-memo.sqlite3, but the caller was not answered yet — a gateway dying
between a step's execution and its answer. before: it ran on the card, nothing was recorded —
a gateway dying in the middle of a step. The command after `--` is `cardline`'s own, run from
the repository root; nothing in the runtime packages knows this fault (it wraps
PersistedSteps.put in this process only). Start it in a process group of its own.
"""
from __future__ import annotations

import argparse
import sys

from gateway.core.idempotency import PersistedSteps, StepKey
from shared import cli
from shared.logging import get_logger
from tests.support.faults import kill_group

log = get_logger("tests.support.faulty_gateway")
# Where the executor puts the operation's name in a step key (gateway/core/executor.py).
OPERATION_IN_KEY = 2


def install(operation: str, after: bool) -> None:
    put = PersistedSteps.put

    async def put_with_kill(self: PersistedSteps, key: StepKey, outcome: bytes) -> None:
        chosen = key[OPERATION_IN_KEY] == operation
        if chosen and not after:
            log.warning("fault injection: SIGKILL of the process group before the step's result is recorded",
                        key=str(key))
            kill_group()
        await put(self, key, outcome)
        if chosen:
            log.warning("fault injection: SIGKILL of the process group after the step's result is recorded, "
                        "before its answer", key=str(key))
            kill_group()

    PersistedSteps.put = put_with_kill  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    fault_argv, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="faulty_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--kill-after-recorded", metavar="OPERATION")
    when.add_argument("--kill-before-recorded", metavar="OPERATION")
    args = parser.parse_args(fault_argv)
    install(args.kill_after_recorded or args.kill_before_recorded, after=bool(args.kill_after_recorded))
    log.warning("TEST-ONLY FAULT INJECTION ACTIVE", fault=" ".join(fault_argv))
    sys.argv = ["cardline", *command]
    cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
