"""Process definitions (YAML), `${name}` expressions and the process map.

A process is a named sequence of tasks plus an `on_error` path (DESIGN.md §4). This module
turns the YAML text into frozen dataclasses, checks everything that can be checked without
running anything, and models the process map a running instance carries. The format is
documented in docs/processes.md.

Loading reports every violation at once, each with file, line and field path, because an
operator fixing a configuration should not have to restart once per mistake.

Pure domain code: PyYAML only; no grpc, no store, no gateway.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import yaml

from shared.cards import ReaderKind

from orchestrator.domain.violations import Violation, YamlSyntaxError, compose_yaml, did_you_mean

# ---------------------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WHOLE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


class ExpressionError(ValueError):
    """A `${...}` expression is malformed, or cannot be rendered."""


class MissingVariable(ExpressionError):
    """A template reads a process variable that has no value."""

    def __init__(self, name: str, template: str) -> None:
        super().__init__(f"process variable {name!r} has no value (needed by {template!r})")
        self.name = name


def _scan(template: str) -> Iterator[tuple[str, bool]]:
    """Yields (piece, is_variable) in order. There is no escape: `${` always opens an
    expression; values substituted in are never scanned again, so they may hold anything."""
    i = 0
    while (start := template.find("${", i)) != -1:
        end = template.find("}", start + 2)
        if end == -1:
            raise ExpressionError(f"'${{' at position {start} is never closed with '}}'")
        inner = template[start + 2:end]
        if "${" in inner:
            raise ExpressionError(f"'${{' at position {start} is not closed before the next '${{' (no nesting)")
        if not inner:
            raise ExpressionError(f"empty expression '${{}}' at position {start}")
        if not _NAME.match(inner):
            raise ExpressionError(f"{inner!r} in '${{{inner}}}' is not a variable name "
                                  "(letters, digits and _, not starting with a digit)")
        if start > i:
            yield template[i:start], False
        yield inner, True
        i = end + 1
    if i < len(template):
        yield template[i:], False


def variables_in(template: str) -> tuple[str, ...]:
    """Names of every `${name}` in template, in order; raises ExpressionError if malformed."""
    return tuple(piece for piece, is_variable in _scan(template) if is_variable)


def variable_of(expr: object) -> str | None:
    """The name if expr is exactly one `${name}` and nothing else, otherwise None."""
    if not isinstance(expr, str):
        return None
    match = _WHOLE_VARIABLE.match(expr)
    return match.group(1) if match else None


def render(template: str, process_map: Mapping[str, object]) -> str:
    """Substitutes every `${name}` with the text of its value.

    Secrets never live in the process map: pass `collections.ChainMap(secrets, process_map)`
    to render a field that needs a PIN. Only text and numbers can be substituted; a
    CoreObjectDescriptor is passed around whole (see variable_of), never pasted into text.
    """
    out = []
    for piece, is_variable in _scan(template):
        if not is_variable:
            out.append(piece)
            continue
        value = process_map.get(piece)
        if value is None:
            raise MissingVariable(piece, template)
        if not isinstance(value, (str, int, float)):
            raise ExpressionError(f"process variable {piece!r} holds {_describe(value)}, "
                                  f"which cannot be put into text ({template!r})")
        out.append(str(value))
    return "".join(out)


def _describe(value: object) -> str:
    if isinstance(value, CoreObjectDescriptor):
        return f"a {value.type} descriptor"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------
# CoreObjectDescriptor and the process map
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CoreObjectDescriptor:
    """Identifies a stored object (DESIGN.md §1); what processes pass around."""
    type: str        # "Certificate", "Card", ... (orchestrator.store.records names them)
    template: str    # the certificate or card template the object was made from
    id: str          # the store id

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "template": self.template, "id": self.id}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> CoreObjectDescriptor:
        if not isinstance(data, Mapping) or set(data) != {"type", "template", "id"}:
            raise ValueError(f"a CoreObjectDescriptor is a dict with exactly type, template and id, not {data!r}")
        values = [data["type"], data["template"], data["id"]]
        if not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"type, template and id of a CoreObjectDescriptor must be non-empty strings: {data!r}")
        return cls(*values)


class SecretInProcessMap(ValueError):
    """Someone tried to store the value of a secret input (a PIN) in the process map."""


def _check_value(name: str, value: object) -> object:
    """Process variables hold JSON scalars, descriptors and lists of those. Plain dicts are
    refused so that every dict in the serialised map is unambiguously a descriptor."""
    if value is None or isinstance(value, (str, bool, int, float, CoreObjectDescriptor)):
        return value
    if isinstance(value, (list, tuple)):
        return [_check_value(name, item) for item in value]
    raise TypeError(f"process variable {name!r} cannot hold {_describe(value)}: "
                    "use text, numbers, booleans, CoreObjectDescriptors or lists of those")


def _to_json(value: object) -> object:
    if isinstance(value, CoreObjectDescriptor):
        return value.to_dict()
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return value


def _from_json(value: object) -> object:
    if isinstance(value, Mapping):
        return CoreObjectDescriptor.from_dict(value)
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


class ProcessMap(MutableMapping[str, object]):
    """The process variables of one process instance.

    It is stored with the instance, so it refuses the names of the process's secret inputs:
    a PIN passes through a task, it never rests in the store or the logs.
    """

    def __init__(self, values: Mapping[str, object] | None = None, *, secret_names: Collection[str] = ()) -> None:
        self._secret_names = frozenset(secret_names)
        self._values: dict[str, object] = {}
        for name, value in (values or {}).items():
            self[name] = value

    @property
    def secret_names(self) -> frozenset[str]:
        return self._secret_names

    def __setitem__(self, name: str, value: object) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise KeyError(f"{name!r} is not a process variable name (letters, digits and _)")
        if name in self._secret_names:
            raise SecretInProcessMap(f"{name!r} is a secret input: it passes through tasks and is never "
                                     "stored in the process map")
        self._values[name] = _check_value(name, value)

    def __getitem__(self, name: str) -> object:
        return self._values[name]

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ProcessMap({self._values!r})"

    def to_dict(self) -> dict[str, object]:
        """JSON-compatible: descriptors become {"type", "template", "id"} dicts, tuples lists."""
        return {name: _to_json(value) for name, value in self._values.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, secret_names: Collection[str] = ()) -> ProcessMap:
        return cls({name: _from_json(value) for name, value in data.items()}, secret_names=secret_names)


# ---------------------------------------------------------------------------------------
# Process definitions
# ---------------------------------------------------------------------------------------

def _frozen(mapping: Mapping | None = None) -> Mapping:
    """A read-only copy, so a loaded definition cannot be changed behind the loader's checks."""
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ReaderSpec:
    """The `reader:` selector of a task, matched against the reader pool; empty = any reader."""
    gateway: str | None = None
    reader: str | None = None
    site: str | None = None
    labels: Mapping[str, str] = field(default_factory=_frozen)
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
    fields: Mapping[str, str] = field(default_factory=_frozen)   # field name -> template
    card: str | None = None                     # variable the new card's descriptor is written to
    # Line of each field in the file, so checks against the encoding description (C13) are located.
    field_lines: Mapping[str, int] = field(default_factory=_frozen, compare=False, repr=False)


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
    fields: Mapping[str, str] = field(default_factory=_frozen)
    field_lines: Mapping[str, int] = field(default_factory=_frozen, compare=False, repr=False)


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


TASK_TYPES: dict[str, type[TaskDefinition]] = {
    cls.type: cls for cls in (CardProductionTask, CardOperationTask, ChangeStateTask,
                              ChangeStateInCaTask, HandleIssuedTask)
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
            problems.append(f"unknown inputs: {', '.join(unknown)} (this process takes: {', '.join(self.inputs) or 'none'})")
        secrets = {name: given[name] for name in self.secret_inputs if name in given}
        not_text = sorted(name for name, value in secrets.items() if not isinstance(value, str))
        if not_text:
            problems.append(f"secret inputs must be text: {', '.join(not_text)}")
        if problems:
            raise ValueError(f"process {self.name!r}: " + "; ".join(problems))
        process_map = ProcessMap({name: value for name, value in given.items() if name not in secrets},
                                 secret_names=self.secret_inputs)
        return process_map, secrets  # type: ignore[return-value]


class ProcessError(ValueError):
    """A process definition was rejected; `violations` lists every problem found."""

    def __init__(self, violations: Collection[Violation]) -> None:
        self.violations = tuple(violations)
        super().__init__("invalid process definition:\n" + "\n".join(f"  {v}" for v in self.violations))


# ---------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"

_TOP_KEYS = ("name", "description", "inputs", "secret_inputs", "tasks", "on_error")
_TASK_KEYS = {
    "card_production": ("type", "card_template", "reader", "subject", "fields", "card"),
    "card_operation": ("type", "card_template", "encoding", "reader", "card", "subject", "fields"),
    "change_state": ("type", "certificates", "card", "state", "reason"),
    "change_state_in_ca": ("type", "certificates", "state", "reason"),
    "handle_issued": ("type", "certificates", "revoke_reason", "target_state"),
}
_READER_KEYS = ("gateway", "reader", "site", "labels", "kind")
_READER_KINDS = {"pcsc": ReaderKind.PCSC, "pkcs11": ReaderKind.PKCS11}


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def load_process(text: str, source: str, *, known_card_templates: Collection[str] | None = None,
                 known_states: Collection[str] | None = None) -> ProcessDefinition:
    """Parses and checks one process definition; raises ProcessError listing every violation.

    known_card_templates / known_states: when given, names used in the file must be among
    them (states: change_state.state, change_state_in_ca.state, handle_issued.target_state).
    """
    return _ProcessReader(source, known_card_templates, known_states).load(text)


class _ProcessReader:
    """One load: collects violations while it walks the composed YAML node tree (nodes, not
    constructed values, because nodes carry the line numbers)."""

    def __init__(self, source: str, known_card_templates: Collection[str] | None,
                 known_states: Collection[str] | None) -> None:
        self.source = source
        self.known_card_templates = None if known_card_templates is None else set(known_card_templates)
        self.known_states = None if known_states is None else set(known_states)
        self.violations: list[Violation] = []

    def fail(self, line: int, path: str, message: str) -> None:
        self.violations.append(Violation(self.source, max(1, line), path, message))

    def load(self, text: str) -> ProcessDefinition:
        root = self.compose(text)
        definition = self.process(root) if root is not None else None
        if self.violations or definition is None:
            raise ProcessError(sorted(self.violations, key=lambda v: v.line))
        return definition

    # -- YAML ---------------------------------------------------------------------------

    def compose(self, text: str) -> yaml.Node | None:
        try:
            root = compose_yaml(text)
        except YamlSyntaxError as e:
            self.fail(e.line, "", e.message)
            return None
        if root is None:
            self.fail(1, "", "the file is empty; a process needs at least name and tasks")
        return root

    def mapping(self, node: yaml.Node, path: str, allowed: Collection[str], required: Collection[str] = (),
                what: str = "key") -> dict[str, yaml.Node] | None:
        """The entries of a mapping node, checked for unknown, duplicate and missing keys.
        A null value counts as absent, so `on_error:` with nothing after it means none."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(_line(node), path, f"must be a mapping of {what}s to values")
            return None
        entries: dict[str, yaml.Node] = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                self.fail(_line(key_node), path, f"keys must be plain text, not {_node_kind(key_node)}")
                continue
            key = key_node.value
            key_path = f"{path}.{key}" if path else key
            if key in seen:
                self.fail(_line(key_node), key_path, f"duplicate {what} {key!r}")
            elif allowed and key not in allowed:
                self.fail(_line(key_node), key_path,
                          f"unknown {what} {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
            elif not (isinstance(value_node, yaml.ScalarNode) and value_node.tag == _NULL):
                entries[key] = value_node
            seen.add(key)
        for key in required:
            if key not in entries:
                self.fail(_line(node), f"{path}.{key}" if path else key, f"missing required {what} {key!r}")
        return entries

    def string(self, node: yaml.Node, path: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return node.value
        self.fail(_line(node), path, f"must be text, not {_node_kind(node)} (quote it)")
        return None

    def literal(self, node: yaml.Node, path: str) -> str | None:
        """A name (template, state, reason, ...): non-empty text, no expressions."""
        value = self.string(node, path)
        if value is None:
            return None
        if not value.strip():
            self.fail(_line(node), path, "must not be empty")
            return None
        if "${" in value:
            self.fail(_line(node), path, "expressions are not allowed here; write the name itself")
            return None
        return value

    def template(self, node: yaml.Node, path: str) -> tuple[str, tuple[str, ...]] | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            return value, variables_in(value)
        except ExpressionError as e:
            self.fail(_line(node), path, f"malformed expression: {e}")
            return None

    def variable(self, node: yaml.Node, path: str) -> str | None:
        """A key whose value must be exactly one `${name}`."""
        parsed = self.template(node, path)
        if parsed is None:
            return None
        name = variable_of(parsed[0])
        if name is None:
            self.fail(_line(node), path, f"must be exactly one variable like '${{name}}', not {parsed[0]!r}")
        return name

    def name_list(self, node: yaml.Node, path: str) -> list[tuple[int, str, yaml.Node]]:
        """(index, name, node) of every well-formed name in a list of variable names."""
        if not isinstance(node, yaml.SequenceNode):
            self.fail(_line(node), path, f"must be a list of names, not {_node_kind(node)}")
            return []
        names = []
        for i, item in enumerate(node.value):
            name = self.string(item, f"{path}[{i}]")
            if name is None:
                continue
            if not _NAME.match(name):
                self.fail(_line(item), f"{path}[{i}]",
                          f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)")
                continue
            names.append((i, name, item))
        return names

    def known(self, node: yaml.Node, path: str, value: str | None, known: set[str] | None, what: str) -> None:
        if value is not None and known is not None and value not in known:
            self.fail(_line(node), path, f"unknown {what} {value!r}{did_you_mean(value, known)}")

    # -- the process ----------------------------------------------------------------------

    def process(self, root: yaml.Node) -> ProcessDefinition | None:
        entries = self.mapping(root, "", _TOP_KEYS, required=("name", "tasks"))
        if entries is None:
            return None
        name = self.literal(entries["name"], "name") if "name" in entries else None
        description = self.string(entries["description"], "description") if "description" in entries else ""

        inputs: list[str] = []
        for i, input_name, item in self.name_list(entries["inputs"], "inputs") if "inputs" in entries else []:
            if input_name in inputs:
                self.fail(_line(item), f"inputs[{i}]", f"duplicate input {input_name!r}")
            inputs.append(input_name)
        secrets: list[str] = []
        for i, secret, item in self.name_list(entries["secret_inputs"], "secret_inputs") if "secret_inputs" in entries else []:
            if secret in secrets:
                self.fail(_line(item), f"secret_inputs[{i}]", f"duplicate secret input {secret!r}")
            elif secret not in inputs:
                self.fail(_line(item), f"secret_inputs[{i}]",
                          f"{secret!r} is not one of the inputs{did_you_mean(secret, inputs)}")
            secrets.append(secret)

        scope = _Scope(set(inputs), set(secrets))
        tasks = self.task_list(entries.get("tasks"), "tasks", scope, required=True)
        # The error path may run after any task failed, so everything the main path may
        # have written counts as defined there (at run time such a variable may be absent).
        on_error = self.task_list(entries.get("on_error"), "on_error", scope, required=False)
        if name is None or description is None or tasks is None or on_error is None:
            return None
        return ProcessDefinition(name=name, source=self.source, inputs=tuple(dict.fromkeys(inputs)),
                                 secret_inputs=tuple(dict.fromkeys(secrets)), tasks=tasks,
                                 on_error=on_error, description=description)

    def task_list(self, node: yaml.Node | None, path: str, scope: _Scope,
                  required: bool) -> tuple[TaskDefinition, ...] | None:
        if node is None:
            return None if required else ()   # a missing `tasks` is already reported
        if not isinstance(node, yaml.SequenceNode):
            self.fail(_line(node), path, f"must be a list of tasks, not {_node_kind(node)}")
            return None
        if required and not node.value:
            self.fail(_line(node), path, "a process needs at least one task")
        tasks = [self.task(item, f"{path}[{i}]", scope) for i, item in enumerate(node.value)]
        return tuple(tasks) if all(t is not None for t in tasks) else None  # type: ignore[arg-type]

    def task(self, node: yaml.Node, path: str, scope: _Scope) -> TaskDefinition | None:
        if not isinstance(node, yaml.MappingNode):
            self.fail(_line(node), path, f"a task must be a mapping with a 'type', not {_node_kind(node)}")
            return None
        # Find the type first: it decides which keys are allowed.
        type_node = next((v for k, v in node.value
                          if isinstance(k, yaml.ScalarNode) and k.tag == _STR and k.value == "type"), None)
        if type_node is None:
            self.fail(_line(node), f"{path}.type", f"missing required key 'type' (one of: {', '.join(TASK_TYPES)})")
            return None
        task_type = self.literal(type_node, f"{path}.type")
        if task_type is None:
            return None
        if task_type not in TASK_TYPES:
            self.fail(_line(type_node), f"{path}.type", f"unknown task type {task_type!r}"
                      f"{did_you_mean(task_type, TASK_TYPES)}; known: {', '.join(TASK_TYPES)}")
            return None
        builder = getattr(self, task_type)
        before = len(self.violations)
        entries = self.mapping(node, path, _TASK_KEYS[task_type], required=_REQUIRED[task_type])
        if entries is None:
            return None
        task = builder(entries, path, _line(node), scope)
        return task if len(self.violations) == before else None

    # -- task parts ------------------------------------------------------------------------

    def read(self, node: yaml.Node, path: str, names: Collection[str], scope: _Scope, secret_ok: bool = False) -> None:
        for name in names:
            if name in scope.secrets and not secret_ok:
                self.fail(_line(node), path, f"secret input {name!r} may only be used in fields "
                                             "(secrets pass through to the card, never anywhere else)")
            elif name not in scope.defined:
                self.fail(_line(node), path, f"variable {name!r} is read here but is neither an input nor "
                                             f"written by an earlier task{did_you_mean(name, scope.defined)}")

    def reader(self, entries: dict[str, yaml.Node], path: str) -> ReaderSpec:
        if "reader" not in entries:
            return ReaderSpec()
        path = f"{path}.reader"
        selector = self.mapping(entries["reader"], path, _READER_KEYS) or {}
        values = {key: self.literal(selector[key], f"{path}.{key}")
                  for key in ("gateway", "reader", "site") if key in selector}
        labels: dict[str, str] = {}
        if "labels" in selector:
            label_nodes = self.mapping(selector["labels"], f"{path}.labels", (), what="label") or {}
            for key, value_node in label_nodes.items():
                value = self.literal(value_node, f"{path}.labels.{key}")
                if value is not None:
                    labels[key] = value
        kind = None
        if "kind" in selector:
            kind_name = self.literal(selector["kind"], f"{path}.kind")
            if kind_name is not None:
                kind = _READER_KINDS.get(kind_name)
                if kind is None:
                    self.fail(_line(selector["kind"]), f"{path}.kind", f"unknown reader kind {kind_name!r}"
                              f"{did_you_mean(kind_name, _READER_KINDS)}; known: {', '.join(_READER_KINDS)}")
        return ReaderSpec(**values, labels=_frozen(labels), kind=kind)

    def subject(self, entries: dict[str, yaml.Node], path: str, scope: _Scope) -> str | None:
        if "subject" not in entries:
            return None
        parsed = self.template(entries["subject"], f"{path}.subject")
        if parsed is None:
            return None
        self.read(entries["subject"], f"{path}.subject", parsed[1], scope)
        return parsed[0]

    def fields(self, entries: dict[str, yaml.Node], path: str,
               scope: _Scope) -> tuple[Mapping[str, str], Mapping[str, int], set[str]]:
        """Field mapping; returns it, the line of each field and the names the task may write. A value that is exactly
        `${x}` may be a return field (the encoding description decides, which the loader does
        not see), so x is not checked as a read and counts as written afterwards. Any other
        value is an input mapping whose variables must already be defined."""
        if "fields" not in entries:
            return _frozen(), _frozen(), set()
        path = f"{path}.fields"
        field_nodes = self.mapping(entries["fields"], path, (), what="field") or {}
        mapping: dict[str, str] = {}
        lines: dict[str, int] = {}
        written: set[str] = set()
        for field_name, value_node in field_nodes.items():
            parsed = self.template(value_node, f"{path}.{field_name}")
            if parsed is None:
                continue
            value, names = parsed
            mapping[field_name] = value
            lines[field_name] = _line(value_node)
            target = variable_of(value)
            if target is not None:
                written.add(target)
            else:
                self.read(value_node, f"{path}.{field_name}", names, scope, secret_ok=True)
        return _frozen(mapping), _frozen(lines), written

    def variable_read(self, entries: dict[str, yaml.Node], key: str, path: str, scope: _Scope) -> str | None:
        if key not in entries:
            return None
        name = self.variable(entries[key], f"{path}.{key}")
        if name is not None:
            self.read(entries[key], f"{path}.{key}", [name], scope)
        return name

    def state(self, entries: dict[str, yaml.Node], key: str, path: str) -> str | None:
        if key not in entries:
            return None
        value = self.literal(entries[key], f"{path}.{key}")
        self.known(entries[key], f"{path}.{key}", value, self.known_states, "state")
        return value

    def optional_literal(self, entries: dict[str, yaml.Node], key: str, path: str) -> str | None:
        return self.literal(entries[key], f"{path}.{key}") if key in entries else None

    def one_of(self, entries: dict[str, yaml.Node], keys: tuple[str, str], path: str, line: int) -> None:
        present = [k for k in keys if k in entries]
        if len(present) != 1:
            self.fail(line, path, f"give exactly one of {keys[0]!r} or {keys[1]!r}"
                      + (", not both" if len(present) == 2 else ""))

    # -- one builder per task type (named after it) ----------------------------------------

    def card_production(self, entries, path, line, scope) -> CardProductionTask:
        template = self.literal(entries["card_template"], f"{path}.card_template") if "card_template" in entries else None
        self.known(entries.get("card_template"), f"{path}.card_template", template,
                   self.known_card_templates, "card template")
        reader = self.reader(entries, path)
        subject = self.subject(entries, path, scope)
        fields, field_lines, written = self.fields(entries, path, scope)
        card = None
        if "card" in entries:   # here `card` is an output: the new card's descriptor goes there
            card = self.variable(entries["card"], f"{path}.card")
            if card in scope.secrets:
                self.fail(_line(entries["card"]), f"{path}.card", f"{card!r} is a secret input; it cannot hold the card")
            elif card is not None:
                written.add(card)
        scope.defined |= written
        return CardProductionTask(line=line, card_template=template or "", reader=reader, subject=subject,
                                  fields=fields, field_lines=field_lines, card=card)

    def card_operation(self, entries, path, line, scope) -> CardOperationTask:
        self.one_of(entries, ("card_template", "encoding"), path, line)
        template = self.optional_literal(entries, "card_template", path)
        self.known(entries.get("card_template"), f"{path}.card_template", template,
                   self.known_card_templates, "card template")
        encoding = self.optional_literal(entries, "encoding", path)
        reader = self.reader(entries, path)
        card = self.variable_read(entries, "card", path, scope)
        subject = self.subject(entries, path, scope)
        fields, field_lines, written = self.fields(entries, path, scope)
        scope.defined |= written
        return CardOperationTask(line=line, card_template=template, encoding=encoding, reader=reader,
                                 card=card, subject=subject, fields=fields, field_lines=field_lines)

    def change_state(self, entries, path, line, scope) -> ChangeStateTask:
        self.one_of(entries, ("certificates", "card"), path, line)
        return ChangeStateTask(line=line, certificates=self.variable_read(entries, "certificates", path, scope),
                               card=self.variable_read(entries, "card", path, scope),
                               state=self.state(entries, "state", path) or "",
                               reason=self.optional_literal(entries, "reason", path))

    def change_state_in_ca(self, entries, path, line, scope) -> ChangeStateInCaTask:
        return ChangeStateInCaTask(line=line,
                                   certificates=self.variable_read(entries, "certificates", path, scope) or "",
                                   state=self.state(entries, "state", path) or "",
                                   reason=self.optional_literal(entries, "reason", path))

    def handle_issued(self, entries, path, line, scope) -> HandleIssuedTask:
        reason = self.optional_literal(entries, "revoke_reason", path)
        if reason is not None and reason not in REVOCATION_REASONS:
            self.fail(_line(entries["revoke_reason"]), f"{path}.revoke_reason",
                      f"unknown revocation reason {reason!r}{did_you_mean(reason, REVOCATION_REASONS)}; "
                      f"RFC 5280 names: {', '.join(REVOCATION_REASONS)}")
        target_state = self.state(entries, "target_state", path)
        if "revoke_reason" not in entries and "target_state" not in entries:
            self.fail(line, path, "handle_issued does nothing without revoke_reason, target_state or both")
        return HandleIssuedTask(line=line, certificates=self.variable_read(entries, "certificates", path, scope),
                                revoke_reason=reason, target_state=target_state)


_REQUIRED = {
    "card_production": ("card_template",),
    "card_operation": (),
    "change_state": ("state",),
    "change_state_in_ca": ("certificates", "state"),
    "handle_issued": (),
}


@dataclass
class _Scope:
    """What a task may read: the inputs plus everything earlier tasks may have written."""
    defined: set[str]
    secrets: set[str]


def _node_kind(node: yaml.Node | None) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node is None or node.tag == _NULL:
        return "nothing"
    return {"tag:yaml.org,2002:int": "a number", "tag:yaml.org,2002:float": "a number",
            "tag:yaml.org,2002:bool": "a boolean"}.get(node.tag, f"a value tagged {node.tag}")
