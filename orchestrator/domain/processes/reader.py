"""Reading a process definition from YAML: every violation at once, each located.

An operator fixing a configuration should not have to restart once per mistake, so the
reader walks the whole file and reports every problem with file, line and field path.

Pure domain code: PyYAML only.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import yaml

from orchestrator.domain.located_yaml import BOOL_TAG, INT_TAG, STR_TAG, LocatedReader, kind_of, line_of
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
    frozen,
)
from orchestrator.domain.processes.expressions import VARIABLE_NAME, ExpressionError, variable_of, variables_in
from orchestrator.domain.violations import did_you_mean
from shared.cards import ReaderKind

_TOP_KEYS = ("name", "description", "inputs", "secret_inputs", "tasks", "on_error")
_TASK_KEYS = {
    "card_production": ("type", "card_template", "reader", "subject", "fields", "card", "holder", "reissue"),
    "card_operation": ("type", "card_template", "encoding", "reader", "card", "subject", "fields", "when_present"),
    "change_state": ("type", "certificates", "card", "state", "reason"),
    "change_state_in_ca": ("type", "certificates", "state", "reason"),
    "handle_issued": ("type", "certificates", "revoke_reason", "target_state"),
    "load_certificates": ("type", "card", "into", "state", "template", "expiring_within_days", "at_least_one"),
}
#: A task's values by key (the key nodes are not needed once the keys are checked).
_Values = dict[str, yaml.Node]

_READER_KEYS = ("gateway", "reader", "site", "labels", "kind")
_READER_KINDS = {"pcsc": ReaderKind.PCSC, "pkcs11": ReaderKind.PKCS11}


def load_process(text: str, source: str, *, known_card_templates: Collection[str] | None = None,
                 known_states: Collection[str] | None = None) -> ProcessDefinition:
    """Parses and checks one process definition; raises ProcessError listing every violation.

    known_card_templates / known_states: when given, names used in the file must be among
    them (states: change_state.state, change_state_in_ca.state, handle_issued.target_state).
    """
    return _ProcessReader(source, known_card_templates, known_states).load(text)


class _ProcessReader(LocatedReader):
    """One load: collects violations while it walks the composed YAML node tree."""

    def __init__(self, source: str, known_card_templates: Collection[str] | None,
                 known_states: Collection[str] | None) -> None:
        super().__init__(source)
        self.known_card_templates = None if known_card_templates is None else set(known_card_templates)
        self.known_states = None if known_states is None else set(known_states)

    def load(self, text: str) -> ProcessDefinition:
        root = self.compose(text, "the file is empty; a process needs at least name and tasks")
        definition = self.process(root) if root is not None else None
        if self.violations or definition is None:
            raise ProcessError(sorted(self.violations, key=lambda v: v.line))
        return definition

    # -- YAML ---------------------------------------------------------------------------

    def mapping(self, node: yaml.Node, path: str, allowed: Collection[str], required: Collection[str] = (),
                what: str = "key") -> _Values | None:
        """The values of a mapping node by key, checked for unknown, duplicate and missing keys;
        no `allowed` keys accepts any. A null value counts as absent, so `on_error:` with
        nothing after it means none."""
        entries = self.entries(node, path, allowed or None, required, what)
        return None if entries is None else {key: value for key, (_key_node, value) in entries.items()}

    def not_a_mapping(self, node: yaml.Node, path: str, what: str) -> None:
        self.report(node, path, f"must be a mapping of {what}s to values")

    def key_name(self, key_node: yaml.Node, path: str, what: str) -> str | None:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STR_TAG:
            self.report(key_node, path, f"keys must be plain text, not {kind_of(key_node)}")
            return None
        return str(key_node.value)

    def duplicate_key(self, key_node: yaml.Node, key_path: str, key: str, what: str, first_line: int) -> None:
        self.report(key_node, key_path, f"duplicate {what} {key!r}")

    def unknown_key(self, key_node: yaml.Node, key_path: str, key: str, what: str,
                    allowed: Collection[str]) -> None:
        self.report(key_node, key_path,
                    f"unknown {what} {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")

    def string(self, node: yaml.Node, path: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == STR_TAG:
            return str(node.value)
        self.report(node, path, f"must be text, not {kind_of(node)} (quote it)")
        return None

    def literal(self, node: yaml.Node, path: str) -> str | None:
        """A name (template, state, reason, ...): non-empty text, no expressions."""
        value = self.string(node, path)
        if value is None:
            return None
        if not value.strip():
            self.report(node, path, "must not be empty")
            return None
        if "${" in value:
            self.report(node, path, "expressions are not allowed here; write the name itself")
            return None
        return value

    def template(self, node: yaml.Node, path: str) -> tuple[str, tuple[str, ...]] | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            return value, variables_in(value)
        except ExpressionError as e:
            self.report(node, path, f"malformed expression: {e}")
            return None

    def variable(self, node: yaml.Node, path: str) -> str | None:
        """A key whose value must be exactly one `${name}`."""
        parsed = self.template(node, path)
        if parsed is None:
            return None
        name = variable_of(parsed[0])
        if name is None:
            self.report(node, path, f"must be exactly one variable like '${{name}}', not {parsed[0]!r}")
        return name

    def name_list(self, node: yaml.Node, path: str) -> list[tuple[int, str, yaml.Node]]:
        """(index, name, node) of every well-formed name in a list of variable names."""
        if not isinstance(node, yaml.SequenceNode):
            self.report(node, path, f"must be a list of names, not {kind_of(node)}")
            return []
        names = []
        for i, item in enumerate(node.value):
            name = self.string(item, f"{path}[{i}]")
            if name is None:
                continue
            if not VARIABLE_NAME.match(name):
                self.report(item, f"{path}[{i}]",
                          f"{name!r} is not a variable name (letters, digits and _, not starting with a digit)")
                continue
            names.append((i, name, item))
        return names

    def known(self, node: yaml.Node | None, path: str, value: str | None, known: set[str] | None,
              what: str) -> None:
        if node is not None and value is not None and known is not None and value not in known:
            self.report(node, path, f"unknown {what} {value!r}{did_you_mean(value, known)}")

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
                self.report(item, f"inputs[{i}]", f"duplicate input {input_name!r}")
            inputs.append(input_name)
        secrets: list[str] = []
        secret_names = self.name_list(entries["secret_inputs"], "secret_inputs") if "secret_inputs" in entries else []
        for i, secret, item in secret_names:
            if secret in secrets:
                self.report(item, f"secret_inputs[{i}]", f"duplicate secret input {secret!r}")
            elif secret not in inputs:
                self.report(item, f"secret_inputs[{i}]",
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
            self.report(node, path, f"must be a list of tasks, not {kind_of(node)}")
            return None
        if required and not node.value:
            self.report(node, path, "a process needs at least one task")
        tasks = [self.task(item, f"{path}[{i}]", scope) for i, item in enumerate(node.value)]
        read = tuple(task for task in tasks if task is not None)
        return read if len(read) == len(tasks) else None

    def task(self, node: yaml.Node, path: str, scope: _Scope) -> TaskDefinition | None:
        if not isinstance(node, yaml.MappingNode):
            self.report(node, path, f"a task must be a mapping with a 'type', not {kind_of(node)}")
            return None
        # Find the type first: it decides which keys are allowed.
        type_node = next((v for k, v in node.value
                          if isinstance(k, yaml.ScalarNode) and k.tag == STR_TAG and k.value == "type"), None)
        if type_node is None:
            self.report(node, f"{path}.type", f"missing required key 'type' (one of: {', '.join(TASK_TYPES)})")
            return None
        task_type = self.literal(type_node, f"{path}.type")
        if task_type is None:
            return None
        if task_type not in TASK_TYPES:
            self.report(type_node, f"{path}.type", f"unknown task type {task_type!r}"
                      f"{did_you_mean(task_type, TASK_TYPES)}; known: {', '.join(TASK_TYPES)}")
            return None
        builder = getattr(self, task_type)
        before = len(self.violations)
        entries = self.mapping(node, path, _TASK_KEYS[task_type], required=_REQUIRED[task_type])
        if entries is None:
            return None
        task = builder(entries, path, line_of(node), scope)
        return task if len(self.violations) == before else None

    # -- task parts ------------------------------------------------------------------------

    def read(self, node: yaml.Node, path: str, names: Collection[str], scope: _Scope, secret_ok: bool = False) -> None:
        for name in names:
            if name in scope.secrets and not secret_ok:
                self.report(node, path, f"secret input {name!r} may only be used in fields "
                                             "(secrets pass through to the card, never anywhere else)")
            elif name not in scope.defined:
                self.report(node, path, f"variable {name!r} is read here but is neither an input nor "
                                             f"written by an earlier task{did_you_mean(name, scope.defined)}")

    def reader(self, entries: _Values, path: str) -> ReaderSpec:
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
                    self.report(selector["kind"], f"{path}.kind", f"unknown reader kind {kind_name!r}"
                              f"{did_you_mean(kind_name, _READER_KINDS)}; known: {', '.join(_READER_KINDS)}")
        return ReaderSpec(**values, labels=frozen(labels), kind=kind)

    def subject(self, entries: _Values, path: str, scope: _Scope) -> str | None:
        if "subject" not in entries:
            return None
        parsed = self.template(entries["subject"], f"{path}.subject")
        if parsed is None:
            return None
        self.read(entries["subject"], f"{path}.subject", parsed[1], scope)
        return parsed[0]

    def fields(self, entries: _Values, path: str,
               scope: _Scope) -> tuple[Mapping[str, str], Mapping[str, int], set[str]]:
        """Field mapping; returns it, the line of each field and the names the task may write. A value that is exactly
        `${x}` may be a return field (the encoding description decides, which the loader does
        not see), so x is not checked as a read and counts as written afterwards. Any other
        value is an input mapping whose variables must already be defined."""
        if "fields" not in entries:
            return frozen(), frozen(), set()
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
            lines[field_name] = line_of(value_node)
            target = variable_of(value)
            if target is not None:
                written.add(target)
            else:
                self.read(value_node, f"{path}.{field_name}", names, scope, secret_ok=True)
        return frozen(mapping), frozen(lines), written

    def variable_read(self, entries: _Values, key: str, path: str, scope: _Scope) -> str | None:
        if key not in entries:
            return None
        name = self.variable(entries[key], f"{path}.{key}")
        if name is not None:
            self.read(entries[key], f"{path}.{key}", [name], scope)
        return name

    def flag(self, entries: _Values, key: str, path: str) -> bool:
        """An optional `true` / `false` (YAML booleans only); absent: false."""
        if key not in entries:
            return False
        node = entries[key]
        if isinstance(node, yaml.ScalarNode) and node.tag == BOOL_TAG:
            return bool(yaml.SafeLoader.bool_values[node.value.lower()])
        found = node.value if isinstance(node, yaml.ScalarNode) else f"a {type(node).__name__}"
        self.report(node, f"{path}.{key}", f"expected true or false, found {found}")
        return False

    def state(self, entries: _Values, key: str, path: str) -> str | None:
        if key not in entries:
            return None
        value = self.literal(entries[key], f"{path}.{key}")
        self.known(entries[key], f"{path}.{key}", value, self.known_states, "state")
        return value

    def optional_literal(self, entries: _Values, key: str, path: str) -> str | None:
        return self.literal(entries[key], f"{path}.{key}") if key in entries else None

    def one_of(self, entries: _Values, keys: tuple[str, str], path: str, line: int) -> None:
        present = [k for k in keys if k in entries]
        if len(present) != 1:
            self.report(line, path, f"give exactly one of {keys[0]!r} or {keys[1]!r}"
                      + (", not both" if len(present) == 2 else ""))

    # -- one builder per task type (named after it) ----------------------------------------

    def card_production(self, entries: _Values, path: str, line: int, scope: _Scope) -> CardProductionTask:
        template = self.optional_literal(entries, "card_template", path)
        self.known(entries.get("card_template"), f"{path}.card_template", template,
                   self.known_card_templates, "card template")
        reader = self.reader(entries, path)
        subject = self.subject(entries, path, scope)
        fields, field_lines, written = self.fields(entries, path, scope)
        card = None
        if "card" in entries:   # here `card` is an output: the new card's descriptor goes there
            card = self.variable(entries["card"], f"{path}.card")
            if card in scope.secrets:
                self.report(entries["card"], f"{path}.card", f"{card!r} is a secret input; it cannot hold the card")
            elif card is not None:
                written.add(card)
        holder = None
        if "holder" in entries:
            parsed = self.template(entries["holder"], f"{path}.holder")
            if parsed is not None:
                self.read(entries["holder"], f"{path}.holder", parsed[1], scope)
                holder = parsed[0]
        scope.defined |= written
        return CardProductionTask(line=line, card_template=template or "", reader=reader, subject=subject,
                                  fields=fields, field_lines=field_lines, card=card, holder=holder,
                                  reissue=self.flag(entries, "reissue", path))

    def card_operation(self, entries: _Values, path: str, line: int, scope: _Scope) -> CardOperationTask:
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
        when_present = self.flag(entries, "when_present", path)
        if when_present and card is None:
            self.report(entries["when_present"], f"{path}.when_present", "needs `card`: it is that card that must "
                        "be present")
        return CardOperationTask(line=line, card_template=template, encoding=encoding, reader=reader,
                                 card=card, subject=subject, fields=fields, field_lines=field_lines,
                                 when_present=when_present)

    def change_state(self, entries: _Values, path: str, line: int, scope: _Scope) -> ChangeStateTask:
        self.one_of(entries, ("certificates", "card"), path, line)
        return ChangeStateTask(line=line, certificates=self.variable_read(entries, "certificates", path, scope),
                               card=self.variable_read(entries, "card", path, scope),
                               state=self.state(entries, "state", path) or "",
                               reason=self.optional_literal(entries, "reason", path))

    def change_state_in_ca(self, entries: _Values, path: str, line: int, scope: _Scope) -> ChangeStateInCaTask:
        return ChangeStateInCaTask(line=line,
                                   certificates=self.variable_read(entries, "certificates", path, scope) or "",
                                   state=self.state(entries, "state", path) or "",
                                   reason=self.optional_literal(entries, "reason", path))

    def handle_issued(self, entries: _Values, path: str, line: int, scope: _Scope) -> HandleIssuedTask:
        reason = self.optional_literal(entries, "revoke_reason", path)
        if reason is not None and reason not in REVOCATION_REASONS:
            self.report(entries["revoke_reason"], f"{path}.revoke_reason",
                      f"unknown revocation reason {reason!r}{did_you_mean(reason, REVOCATION_REASONS)}; "
                      f"RFC 5280 names: {', '.join(REVOCATION_REASONS)}")
        target_state = self.state(entries, "target_state", path)
        if "revoke_reason" not in entries and "target_state" not in entries:
            self.report(line, path, "handle_issued does nothing without revoke_reason, target_state or both")
        return HandleIssuedTask(line=line, certificates=self.variable_read(entries, "certificates", path, scope),
                                revoke_reason=reason, target_state=target_state)

    def load_certificates(self, entries: _Values, path: str, line: int, scope: _Scope) -> LoadCertificatesTask:
        card = self.variable_read(entries, "card", path, scope)
        into = self.variable(entries["into"], f"{path}.into") if "into" in entries else None
        if into is not None and into in scope.secrets:
            self.report(entries["into"], f"{path}.into", f"{into!r} is a secret input; it cannot hold certificates")
        days = None
        if "expiring_within_days" in entries:
            node, days_path = entries["expiring_within_days"], f"{path}.expiring_within_days"
            if isinstance(node, yaml.ScalarNode) and node.tag == INT_TAG and str(node.value).isdigit():
                days = str(int(node.value))
            else:
                parsed = self.template(node, days_path)
                if parsed is not None:
                    days = parsed[0]
                    if variable_of(days) is not None:
                        self.read(node, days_path, parsed[1], scope)
                    elif not days.isdigit():
                        self.report(node, days_path, f"must be a number of days or '${{name}}', not {days!r}")
        at_least_one = False
        if "at_least_one" in entries:
            node = entries["at_least_one"]
            if isinstance(node, yaml.ScalarNode) and node.tag == BOOL_TAG:
                at_least_one = bool(yaml.SafeLoader.bool_values[node.value.lower()])
            else:
                self.report(node, f"{path}.at_least_one", f"must be true or false, not {kind_of(node)}")
        if into is not None:
            scope.defined.add(into)
        return LoadCertificatesTask(line=line, card=card or "", into=into or "",
                                    state=self.state(entries, "state", path),
                                    template=self.optional_literal(entries, "template", path),
                                    expiring_within_days=days, at_least_one=at_least_one)


_REQUIRED = {
    "card_production": ("card_template",),
    "card_operation": (),
    "change_state": ("state",),
    "change_state_in_ca": ("certificates", "state"),
    "handle_issued": (),
    "load_certificates": ("card", "into"),
}


@dataclass
class _Scope:
    """What a task may read: the inputs plus everything earlier tasks may have written."""
    defined: set[str]
    secrets: set[str]
