"""TEST-ONLY entry script: `cardline orchestrator serve` with faults for the C16 crash tests.

    python -m tests.support.faulty_orchestrator [fault options] -- [serve options]

It builds and serves the orchestrator exactly as the command does (orchestrator.app.serve
through shared.cli.run_server: flags > environment > file), with the faults of
tests/support/faults.py installed through the orchestrator's boundary and CA hooks. The serve
options after `--` are the command's (--listen, --data-dir, --database-url, --config-dir,
--config, --insecure); run it from the repository root.
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import signal
import sys
from collections.abc import Callable

from orchestrator.app import serve
from orchestrator.ca import CaConnector
from shared import config
from shared.cli import run_server
from shared.logging import get_logger
from tests.support import faults

log = get_logger("tests.support.faulty_orchestrator")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faulty_orchestrator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-at", metavar="BOUNDARY[:N]",
                        help="SIGKILL the process group at the N-th (default 1) occurrence of BOUNDARY")
    parser.add_argument("--stop-at", metavar="BOUNDARY[:N]",
                        help="SIGSTOP the process group at the N-th (default 1) occurrence of BOUNDARY (a frozen "
                             "replica: the test sends SIGCONT)")
    parser.add_argument("--kill-delay-ms", type=_positive, default=0,
                        help="with --kill-at: wait this long at the boundary before the kill")
    parser.add_argument("--ca-lost-answer", type=_positive, metavar="N",
                        help="the N-th CA issue call issues, then raises CaUnavailable")
    parser.add_argument("--ca-down", action="store_true", help="every CA call raises CaUnavailable")
    parser.add_argument("--kill-after-task-success", action="store_true",
                        help="SIGKILL the process group when the first card task has succeeded, before its "
                             "process instance ends")
    parser.add_argument("--kill-in-ca-issue", choices=("before", "after"),
                        help="SIGKILL the process group inside the first CA issue call, before or after issuing")
    return parser


def _serve_options(argv: list[str]) -> dict:
    serve_parser = argparse.ArgumentParser(prog="serve options")
    for flag in ("--listen", "--database-url"):
        serve_parser.add_argument(flag)
    for flag in ("--data-dir", "--config-dir", "--config"):
        serve_parser.add_argument(flag, type=pathlib.Path)
    serve_parser.add_argument("--insecure", action="store_true", default=None)
    serve_parser.add_argument("--migrate", action="store_true", default=None)
    options = vars(serve_parser.parse_args(argv))
    options["config_file"] = options.pop("config")
    return options


def _kill_after_task_success() -> None:
    """The orchestrator has no hook between a card task's end and its process instance's end,
    so this entry script wraps CardTaskService.run (test-only, in this process only)."""
    from orchestrator.services.card_tasks import CardTaskService

    run = CardTaskService.run

    async def run_then_die(self, *args, **kwargs):
        outcome = await run(self, *args, **kwargs)
        if outcome.succeeded:
            log.warning("fault injection: SIGKILL of the process group after a successful card task")
            faults.kill_group()
        return outcome

    CardTaskService.run = run_then_die  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    fault_argv, serve_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _parser().parse_args(fault_argv)
    boundary = None
    installed = []
    if args.kill_at:
        name, _, nth = args.kill_at.partition(":")
        boundary = faults.kill_hook(name, _positive(nth) if nth else 1, args.kill_delay_ms / 1000)
        installed.append(f"SIGKILL of the process group at {args.kill_at}")
    elif args.stop_at:
        name, _, nth = args.stop_at.partition(":")
        boundary = faults.kill_hook(name, _positive(nth) if nth else 1, 0.0, signal.SIGSTOP)
        installed.append(f"SIGSTOP of the process group at {args.stop_at}")
    wrap_cas: Callable[[dict[str, CaConnector]], dict[str, CaConnector]] | None = None
    if args.ca_down:
        wrap_cas = lambda cas: {name: faults.UnreachableCa(ca) for name, ca in cas.items()}  # noqa: E731
        installed.append("every CA unreachable")
    elif args.ca_lost_answer:
        counter = itertools.count(1)
        wrap_cas = lambda cas: {name: faults.AnswerLosingCa(ca, args.ca_lost_answer, counter)  # noqa: E731
                                for name, ca in cas.items()}
        installed.append(f"CA answer #{args.ca_lost_answer} lost after issuance")
    elif args.kill_in_ca_issue:
        counter = itertools.count(1)
        wrap_cas = lambda cas: {name: faults.GroupKillingCa(ca, args.kill_in_ca_issue, counter)  # noqa: E731
                                for name, ca in cas.items()}
        installed.append(f"SIGKILL of the process group inside the first CA issue call ({args.kill_in_ca_issue})")
    if args.kill_after_task_success:
        _kill_after_task_success()
        installed.append("SIGKILL of the process group after the first successful card task")
    options = _serve_options(serve_argv)

    async def serve_with_faults(settings) -> None:
        for fault in installed:
            log.warning("TEST-ONLY FAULT INJECTION ACTIVE", fault=fault)
        await serve(settings, boundary=boundary, wrap_cas=wrap_cas)

    run_server(config.OrchestratorSettings, serve_with_faults, json_logs=False, **options)


if __name__ == "__main__":
    main(sys.argv[1:])
