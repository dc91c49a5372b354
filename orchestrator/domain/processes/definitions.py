"""Process definitions: what a loaded process file is, as frozen dataclasses.

A process is a named sequence of tasks plus an `on_error` path (docs/processes.md).

Pure domain code.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, TypeVar

from orchestrator.domain.processes.process_map import ProcessMap
from orchestrator.domain.violations import Violation
from shared.cards import ReaderKind

V = TypeVar("V")


def frozen(mapping: Mapping[str, V] | None = None) -> Mapping[str, V]:
    """A read-only copy, so a loaded definition cannot be changed behind the loader's checks."""
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ReaderSpec:
    """The `reader:` selector of a task, matched against the reader pool; empty = any reader."""
    gateway: str | None = None
    reader: str | None = None
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=frozen)
    kind: ReaderKind | None = None


@dataclass(frozen=True, kw_only=True)
class TaskDefinition:
    """Base of the task dataclasses; `line` is where the task starts in its file."""
    type: ClassVar[str]
    line: int


@dataclass(frozen=True, kw_only=True)
class CardProductionTask(TaskDefinition):
    """Produces a new card object (C8) from a card template and its encoding description."""
    type: ClassVar[str] = "card_production"
    card_template: str
    reader: ReaderSpec = ReaderSpec()
    subject: str | None = None                  # template, e.g. "CN=${person},O=Example"
    fields: Mapping[str, str] = field(default_factory=frozen)   # field name -> template
    card: str | None = None                     # variable the new card's descriptor is written to
    holder: str | None = None                   # template of who the card is for, e.g. "${person}"
    # Line of each field in the file, so checks against the encoding description (C13) are located.
    field_lines: Mapping[str, int] = field(default_factory=frozen, compare=False, repr=False)
    # The process re-issues a card that may already hold a live card object: the new card
    # object takes the physical card over (docs/lifecycle.md). Otherwise such a card is refused.
    reissue: bool = False


@dataclass(frozen=True, kw_only=True)
class CardOperationTask(TaskDefinition):
    """Works on an existing card (C8), the one in variable `card` if given; exactly one of
    card_template (its encoding description) or encoding (a named one) is set."""
    type: ClassVar[str] = "card_operation"
    card_template: str | None = None
    encoding: str | None = None
    reader: ReaderSpec = ReaderSpec()
    card: str | None = None                     # variable holding the card's descriptor
    subject: str | None = None
    fields: Mapping[str, str] = field(default_factory=frozen)
    field_lines: Mapping[str, int] = field(default_factory=frozen, compare=False, repr=False)
    # Run only if the card is in a reader of the pool right now (then on that reader); else skip.
    when_present: bool = False


@dataclass(frozen=True, kw_only=True)
class ChangeStateTask(TaskDefinition):
    """Moves certificates or a card along their state graph in the store (no CA involved);
    exactly one of certificates or card (both variable names) is set."""
    type: ClassVar[str] = "change_state"
    certificates: str | None = None
    card: str | None = None
    state: str
    reason: str | None = None                   # reason of the state-graph transition


@dataclass(frozen=True, kw_only=True)
class ChangeStateInCaTask(TaskDefinition):
    """Changes certificates' state through the CA; the CA action follows from the state by
    the strict table of C17."""
    type: ClassVar[str] = "change_state_in_ca"
    certificates: str
    state: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class HandleIssuedTask(TaskDefinition):
    """Handles certificates left in the internal issued state (C5), usually in on_error.
    certificates None = every certificate of this process instance still in that state."""
    type: ClassVar[str] = "handle_issued"
    certificates: str | None = None
    revoke_reason: str | None = None            # RFC 5280 reason name; None = do not revoke at the CA
    target_state: str | None = None             # store state to move them to; None = leave the state


@dataclass(frozen=True, kw_only=True)
class LoadCertificatesTask(TaskDefinition):
    """Searches the certificates of the card in variable `card` and writes their
    CoreObjectDescriptors (a list, oldest first) into variable `into`, so that later tasks can
    act on them. Filters combine with AND: state, certificate template, and expiring within
    `expiring_within_days` days (a number, or `${name}` holding one). `at_least_one`: finding
    none fails the task (and so the process, before it touches anything)."""
    type: ClassVar[str] = "load_certificates"
    card: str
    into: str
    state: str | None = None
    template: str | None = None
    expiring_within_days: str | None = None     # digits, or a `${name}` template
    at_least_one: bool = False


TASK_TYPES: dict[str, type[TaskDefinition]] = {
    cls.type: cls for cls in (CardProductionTask, CardOperationTask, ChangeStateTask,
                              ChangeStateInCaTask, HandleIssuedTask, LoadCertificatesTask)
}

# RFC 5280 CRLReason names usable to revoke. removeFromCRL is left out: it lifts a hold, it
# does not revoke, and a process asking for it while "handling" a certificate is a mistake.
REVOCATION_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                      "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise")


@dataclass(frozen=True)
class ProcessDefinition:
    name: str
    source: str
    inputs: tuple[str, ...]
    secret_inputs: tuple[str, ...]
    tasks: tuple[TaskDefinition, ...]
    on_error: tuple[TaskDefinition, ...] = ()
    description: str = ""

    def split_inputs(self, given: Mapping[str, object]) -> tuple[ProcessMap, dict[str, str]]:
        """Checks the caller's inputs and splits them into the process map to store and the
        secrets that only pass through. Raises ValueError listing every missing/unknown input."""
        missing = [name for name in self.inputs if name not in given]
        unknown = sorted(name for name in given if name not in self.inputs)
        problems = []
        if missing:
            problems.append(f"missing inputs: {', '.join(missing)}")
        if unknown:
            takes = ", ".join(self.inputs) or "none"
            problems.append(f"unknown inputs: {', '.join(unknown)} (this process takes: {takes})")
        given_secrets = [name for name in self.secret_inputs if name in given]
        secrets = {name: value for name in given_secrets if isinstance(value := given[name], str)}
        not_text = sorted(name for name in given_secrets if name not in secrets)
        if not_text:
            problems.append(f"secret inputs must be text: {', '.join(not_text)}")
        if problems:
            raise ValueError(f"process {self.name!r}: " + "; ".join(problems))
        process_map = ProcessMap({name: value for name, value in given.items() if name not in secrets},
                                 secret_names=self.secret_inputs)
        return process_map, secrets


class ProcessError(ValueError):
    """A process definition was rejected; `violations` lists every problem found."""

    def __init__(self, violations: Collection[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("invalid process definition:\n" + "\n".join(f"  {v}" for v in self.violations))

