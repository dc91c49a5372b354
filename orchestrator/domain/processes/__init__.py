"""Processes: `${name}` expressions, the process map, process definitions and their reader.

A process is a named sequence of tasks plus an `on_error` path; its YAML format is
documented in docs/processes.md. The parts:

- expressions.py  `${name}` scanning and rendering
- descriptor.py   CoreObjectDescriptor, what processes pass around to name stored objects
- process_map.py  the variables of a running instance (never a secret input)
- definitions.py  the loaded definition as frozen dataclasses
- reader.py       YAML text → definition, every violation located

Pure domain code: PyYAML only; no grpc, no store, no gateway.
"""
from orchestrator.domain.processes.definitions import (
    REVOCATION_REASONS,
    TASK_TYPES,
    CardOperationTask,
    CardProductionTask,
    ChangeStateInCaTask,
    ChangeStateTask,
    HandleIssuedTask,
    LoadCertificatesTask,
    ProcessDefinition,
    ProcessError,
    ReaderSpec,
    TaskDefinition,
)
from orchestrator.domain.processes.descriptor import CoreObjectDescriptor
from orchestrator.domain.processes.expressions import (
    ExpressionError,
    MissingVariable,
    render,
    variable_of,
    variables_in,
)
from orchestrator.domain.processes.process_map import ProcessMap, SecretInProcessMap
from orchestrator.domain.processes.reader import load_process

__all__ = [
    "REVOCATION_REASONS",
    "TASK_TYPES",
    "CardOperationTask",
    "CardProductionTask",
    "ChangeStateInCaTask",
    "ChangeStateTask",
    "CoreObjectDescriptor",
    "ExpressionError",
    "HandleIssuedTask",
    "LoadCertificatesTask",
    "MissingVariable",
    "ProcessDefinition",
    "ProcessError",
    "ProcessMap",
    "ReaderSpec",
    "SecretInProcessMap",
    "TaskDefinition",
    "load_process",
    "render",
    "variable_of",
    "variables_in",
]
