"""The orchestrator's configuration directory, loaded and checked as a whole.

    config_dir/state-graphs/*.yaml   state graphs             (docs/state-graphs.md)
    config_dir/templates/*.yaml      certificate/card templates (docs/templates.md)
    config_dir/encodings/*.ini       encoding descriptions; name = file stem (docs/encoding-descriptions.md)
    config_dir/processes/*.yaml      processes                 (docs/processes.md)

Each file is parsed by its domain loader; then everything one file cannot check alone is
checked across files: templates name existing state graphs of the right kind and known CAs,
card states exist in the card graph, encodings name existing certificate templates,
processes name existing card templates, encodings and states, field mappings satisfy C13,
the internal issued state satisfies C14/C15. Every violation of every file is collected and
raised as ONE shared.errors.ConfigurationError (one violation per line, `violations`
attribute) so an operator fixes the whole configuration in one go. Doubtful but valid
configurations (C6: revokeOnIssue without a following change_state) end up in
`Configuration.warnings`.

A violation found in one file does not produce follow-on violations elsewhere: a template
naming a state graph whose file is broken is not also told the graph does not exist.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import yaml

from orchestrator.domain.card_certificates import check_certificate_moves
from orchestrator.domain.certificate_content import BUILTIN_VARIABLES
from orchestrator.domain.encoding import (
    EncodingDescription,
    EncodingError,
    check_field_mapping,
    parse_encoding,
    process_variable_of,
)
from orchestrator.domain.issued_state import INTERNAL_ISSUED_STATE_KEY, TemplateRef, check_internal_issued_state
from orchestrator.domain.processes import (
    CardOperationTask,
    CardProductionTask,
    ChangeStateInCaTask,
    ChangeStateTask,
    HandleIssuedTask,
    LoadCertificatesTask,
    ProcessDefinition,
    ProcessError,
    TaskDefinition,
    load_process,
)
from orchestrator.domain.state_graphs import (
    DEFAULT_INTERNAL_ISSUED_STATE,
    StateGraph,
    StateGraphError,
    Violation,
    load_state_graph,
    suggest,
)
from orchestrator.domain.templates import CardTemplate, CertificateTemplate, Templates, read_templates
from shared.errors import ConfigurationError
from shared.transport_puk import read_key_file as read_transport_key

__all__ = ["CERTIFICATE_HOLD", "SUBDIRECTORIES", "Configuration", "RejectedConfiguration", "load_configuration"]

#: The sub-directories of a configuration directory.
SUBDIRECTORIES = ("state-graphs", "templates", "encodings", "processes")
CERTIFICATE_HOLD = "certificateHold"

_YAML_SUFFIXES = (".yaml", ".yml")
_Template = TypeVar("_Template", CertificateTemplate, CardTemplate)


class RejectedConfiguration(ConfigurationError):
    """A ConfigurationError (same reason) that also holds, for this process only, each
    violation and the warnings; across a link it is a plain ConfigurationError."""

    def __init__(self, message: str, violations: tuple[Violation, ...], warnings: tuple[str, ...],
                 **details: object) -> None:
        super().__init__(message, **details)
        self.violations = violations
        self.warnings = warnings


@dataclass(frozen=True)
class Configuration:
    graphs: dict[str, StateGraph]
    templates: Templates                       # start/initial states filled from the graphs
    encodings: dict[str, EncodingDescription]  # by file stem
    processes: dict[str, ProcessDefinition]    # by process name
    warnings: tuple[str, ...] = ()             # located, one line each
    internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE
    config_dir: pathlib.Path = field(default=pathlib.Path("."), compare=False)
    # Every file read, relative to config_dir, with the SHA-256 of its bytes (the audit of a load).
    files: Mapping[str, str] = field(default_factory=dict, compare=False)


def load_configuration(config_dir: pathlib.Path, *, internal_issued_state: str = DEFAULT_INTERNAL_ISSUED_STATE,
                       known_cas: Collection[str] = ("local",),
                       secrets_dir: pathlib.Path | None = None) -> Configuration:
    """Loads and cross-checks the whole configuration directory. A card template's
    transport_puk_key_file is read from SECRETS_DIR (default: CONFIG_DIR/secrets) and must
    stay inside it.

    Raises ConfigurationError listing every violation of every file (also available as
    its `violations` attribute, a tuple of located Violations; `warnings` holds the
    warnings found on the way).
    """
    loader = _Loader(pathlib.Path(config_dir), internal_issued_state, tuple(known_cas))
    if secrets_dir is not None:
        loader.secrets_dir = pathlib.Path(secrets_dir)
    return loader.load()


# --------------------------------------------------------------------------- the loader


class _Loader:
    def __init__(self, config_dir: pathlib.Path, issued: str, known_cas: tuple[str, ...]) -> None:
        self.dir = config_dir
        self.secrets_dir = config_dir / "secrets"
        self.read_files: dict[str, str] = {}
        self.issued = issued
        self.known_cas = known_cas
        self.violations: list[Violation] = []
        self.warnings: list[Violation] = []
        self.graphs: dict[str, StateGraph] = {}
        self.broken_graphs: set[str] = set()        # names declared by files that did not load
        self.graph_files_broken = False             # some graph file did not load (names maybe unknown)
        self.certificates: dict[str, CertificateTemplate] = {}
        self.cards: dict[str, CardTemplate] = {}
        self.certificate_names: set[str] = set()    # every declared name, valid or not
        self.card_names: set[str] = set()
        self.encodings: dict[str, EncodingDescription] = {}
        self.encoding_names: set[str] = set()       # every encoding file, valid or not
        self.processes: dict[str, ProcessDefinition] = {}
        self.issued_by_processes: set[str] = set()  # certificate templates some process issues
        self.secret_files: dict[str, str] = {}       # card template -> its transport PUK key file

    def fail(self, source: str, line: int, path: str, message: str, suggestion: str | None = None) -> None:
        self.violations.append(Violation(source, max(line, 1), path, message, suggestion))

    def warn(self, source: str, line: int, path: str, message: str, suggestion: str | None = None) -> None:
        self.warnings.append(Violation(source, max(line, 1), path, message, suggestion))

    def adopt(self, found: Iterable, *, warning: bool = False) -> None:
        """Takes over the violations of the file loaders (one Violation type for all)."""
        for v in found:
            (self.warn if warning else self.fail)(v.source, v.line, v.field_path, v.message, v.suggestion)

    # -- files ------------------------------------------------------------------------------

    def files(self, sub: str, suffixes: tuple[str, ...], required: bool) -> list[pathlib.Path]:
        directory = self.dir / sub
        if not directory.is_dir():
            if required:
                self.fail(str(directory), 1, "", f"directory missing: the configuration needs {sub}/ "
                          f"in {self.dir}")
            return []
        return sorted(p for p in directory.iterdir()
                      if p.suffix in suffixes and p.is_file() and not p.name.startswith("."))

    def read(self, path: pathlib.Path) -> str | None:
        raw = path.read_bytes()
        self.read_files[str(path.relative_to(self.dir))] = hashlib.sha256(raw).hexdigest()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(str(path), raw.count(b"\n", 0, e.start) + 1, "", f"not UTF-8 text (byte {e.start})")
            return None

    # -- the whole ---------------------------------------------------------------------------

    def load(self) -> Configuration:
        if not self.dir.is_dir():
            self.fail(str(self.dir), 1, "", "configuration directory does not exist (setting config_dir)")
        else:
            self.load_graphs()
            if not self.graph_files_broken:     # a broken certificate graph would read as a missing one
                self.adopt(check_certificate_moves(self.graphs))
            self.load_templates()
            self.load_encodings()
            self.check_templates()
            self.load_processes()
            self.check_content_variables()
            self.check_issued_state()
        warnings = tuple(str(w) for w in _ordered(self.warnings))
        if self.violations:
            violations = tuple(_ordered(self.violations))
            count = len(violations)
            raise RejectedConfiguration(
                f"{count} problem{'s' if count != 1 else ''} in the configuration {self.dir}:\n"
                + "\n".join(str(v) for v in violations),
                violations, warnings, config_dir=str(self.dir), count=str(count))
        templates = Templates(
            certificates={n: replace(t, start_state=self.graphs[t.state_graph].start)
                          for n, t in self.certificates.items()},
            cards={n: replace(t, initial_state=self.graphs[t.state_graph].start,
                              transport_puk_key_file=self.secret_files.get(n, ""))
                   for n, t in self.cards.items()},
            internal_issued_state=self.issued)
        return Configuration(self.graphs, templates, self.encodings, self.processes, warnings, self.issued,
                             self.dir, dict(sorted(self.read_files.items())))

    # -- state graphs ----------------------------------------------------------------------

    def load_graphs(self) -> None:
        for path in self.files("state-graphs", _YAML_SUFFIXES, required=True):
            text = self.read(path)
            if text is None:
                self.graph_files_broken = True
                continue
            try:
                graph = load_state_graph(text, str(path), self.issued)
            except StateGraphError as e:
                self.adopt(e.violations)
                retried = self.retry_graph(text, path)
                if retried is None:
                    self.graph_files_broken = True
                    name = _declared_name(text)
                    if name:
                        self.broken_graphs.add(name)
                    continue
                graph = retried
            if graph.name in self.graphs:
                first = self.graphs[graph.name]
                self.fail(graph.source, graph.line, "name", f"state graph {graph.name!r} is already defined "
                          f"in {first.source}:{first.line}")
                continue
            self.graphs[graph.name] = graph

    def retry_graph(self, text: str, path: pathlib.Path) -> StateGraph | None:
        """A certificate graph still written for the default internal issued state fails to
        load under a custom one (its old issued state is unreachable). Its violations are
        reported; loading it for the default lets the C14 check (and the files that name it)
        still be checked now, so that every violation is listed in one go."""
        if self.issued == DEFAULT_INTERNAL_ISSUED_STATE:
            return None
        try:
            return load_state_graph(text, str(path), DEFAULT_INTERNAL_ISSUED_STATE)
        except StateGraphError:
            return None

    def graph(self, name: str, kind: str, source: str, line: int, path: str, what: str) -> StateGraph | None:
        """The graph `name` of `kind`, or None after reporting why not (nothing if its file is broken)."""
        graph = self.graphs.get(name)
        if graph is None:
            if name not in self.broken_graphs:
                same_kind = [g.name for g in self.graphs.values() if g.kind == kind]
                self.fail(source, line, path, f"{what}: names the state graph {name!r}, which does not exist "
                          f"(known {kind} state graphs: {', '.join(sorted(same_kind)) or 'none'})",
                          suggest(name, same_kind))
            return None
        if graph.kind != kind:
            self.fail(source, line, path, f"{what}: names the state graph {name!r}, which is a {graph.kind} "
                      f"state graph, not a {kind} state graph")
            return None
        return graph

    # -- templates -------------------------------------------------------------------------

    def load_templates(self) -> None:
        for path in self.files("templates", _YAML_SUFFIXES, required=True):
            text = self.read(path)
            if text is None:
                continue
            parsed = read_templates(text, str(path))
            self.adopt(parsed.violations)
            self.certificate_names |= parsed.certificate_names
            self.card_names |= parsed.card_names
            self.add_templates("certificate", parsed.certificates, self.certificates)
            self.add_templates("card", parsed.cards, self.cards)

    def add_templates(self, kind: str, templates: Iterable[_Template], known: dict[str, _Template]) -> None:
        for t in templates:
            if t.name in known:
                first = known[t.name]
                self.fail(t.source, t.line, "name", f"{kind} template {t.name!r} is already defined "
                          f"in {first.source}:{first.line}")
                continue
            known[t.name] = t

    def check_templates(self) -> None:
        # Certificate templates' state graphs are checked with C14 (check_issued_state).
        for c in self.certificates.values():
            if c.ca not in self.known_cas:
                self.fail(c.source, c.line_of("ca"), "ca", f"certificate template {c.name!r}: unknown CA {c.ca!r} "
                          f"(configured CAs: {', '.join(self.known_cas) or 'none'})", suggest(c.ca, self.known_cas))
        for t in self.cards.values():
            what = f"card template {t.name!r}"
            if t.encoding not in self.encoding_names:
                self.fail(t.source, t.line_of("encoding"), "encoding",
                          f"{what}: no encoding description {t.encoding!r} (a file encodings/{t.encoding}.ini; "
                          f"known: {', '.join(sorted(self.encoding_names)) or 'none'})",
                          suggest(t.encoding, self.encoding_names))
            graph = self.graph(t.state_graph, "card", t.source, t.line_of("state_graph"), "state_graph", what)
            if graph is None:
                continue
            for key in ("produced_state", "failed_state"):
                state = getattr(t, key)
                if state not in graph.states:
                    self.fail(t.source, t.line_of(key), key, f"{what}: state {state!r} is not a state of the card "
                              f"state graph {graph.name!r}", suggest(state, graph.states))
                elif graph.transition(graph.start, state) is None:
                    self.fail(t.source, t.line_of(key), key, f"{what}: the card state graph {graph.name!r} has no "
                              f"transition from its start state {graph.start!r} to {state!r}, which a "
                              f"production ends in")
        for t in self.cards.values():
            if t.transport_puk_key_file:
                self.check_secret_file(t, "transport_puk_key_file", t.transport_puk_key_file)

    def check_secret_file(self, t: CardTemplate, key: str, name: str) -> None:
        """A secret file stays inside secrets_dir (no `../`, no absolute path elsewhere) and,
        when present, holds a transport PUK key; its resolved path is kept for the card tasks.
        A missing file is accepted: it may be provided later (a Docker secret, say), and a
        production that needs it fails naming it."""
        where = f"card template {t.name!r}: {key} {name!r}"
        # Lexically (`..` folded, links not followed): a secret mounted as a link into the
        # directory (docker, Kubernetes) is the operator's choice and stays allowed.
        secrets_dir = pathlib.Path(os.path.abspath(self.secrets_dir))
        path = pathlib.Path(os.path.normpath(secrets_dir / name))
        if not path.is_relative_to(secrets_dir):
            self.fail(t.source, t.line_of(key), key, f"{where} is outside the secrets directory {secrets_dir} "
                      "(setting secrets_dir): secret files are named relative to it")
            return
        self.secret_files[t.name] = str(path)
        if not path.exists():
            return
        try:
            read_transport_key(path)
        except ConfigurationError as exc:
            self.fail(t.source, t.line_of(key), key, f"{where}: {exc.message}")

    # -- encodings -------------------------------------------------------------------------

    def load_encodings(self) -> None:
        paths = self.files("encodings", (".ini",), required=False)
        self.encoding_names = {p.stem for p in paths}
        for path in paths:
            text = self.read(path)
            if text is None:
                continue
            try:
                encoding = parse_encoding(text, str(path), sorted(self.certificate_names))
            except EncodingError as e:
                self.adopt(e.violations)
                continue
            self.adopt(encoding.warnings, warning=True)
            self.encodings[path.stem] = encoding
            for app in encoding.applications:
                template = self.certificates.get(app.certificate_template or "")
                if app.issues_certificate and template is not None and app.generate_key_pair is not None \
                        and app.generate_key_pair != template.key_type:
                    self.warn(encoding.source, app.line_of("GenerateKeyPair"), f"{app.name}.GenerateKeyPair",
                              f"generates a key of type {app.generate_key_pair.value}, but certificate template "
                              f"{template.name!r} says key_type {template.key_type.value}; the encoding's key "
                              "type is used")

    # -- processes -------------------------------------------------------------------------

    def load_processes(self) -> None:
        all_states = None if self.graph_files_broken else {s for g in self.graphs.values() for s in g.states}
        for path in self.files("processes", _YAML_SUFFIXES, required=False):
            text = self.read(path)
            if text is None:
                continue
            try:
                process = load_process(text, str(path), known_card_templates=self.card_names,
                                       known_states=all_states)
            except ProcessError as e:
                self.adopt(e.violations)
                continue
            if process.name in self.processes:
                first = self.processes[process.name]
                self.fail(process.source, 1, "name", f"process {process.name!r} is already defined in "
                          f"{first.source}")
                continue
            self.processes[process.name] = process
            _ProcessChecks(self, process).run()

    def check_content_variables(self) -> None:
        """A template no process issues gets only the built-in variables (a ProduceCard request
        gives no others): any other variable its subject or subjectAltNames read is unknown."""
        for c in self.certificates.values():
            if c.name in self.issued_by_processes:
                continue                            # checked against each process that issues it
            for variable in c.content_variables:
                if variable not in BUILTIN_VARIABLES:
                    key = "subject" if c.subject and variable in c.subject.variables else "subject_alt_names"
                    self.fail(c.source, c.line_of(key), key,
                              f"certificate template {c.name!r}: unknown variable {variable!r}: no process issues "
                              f"this template to give it as an input, and the built-in ones are "
                              f"{', '.join(BUILTIN_VARIABLES)}", suggest(variable, BUILTIN_VARIABLES))

    # -- C14 / C15 -------------------------------------------------------------------------

    def check_issued_state(self) -> None:
        refs = [TemplateRef(t.name, t.source, t.line, t.state_graph, t.internal_issued_state or None)
                for t in self.certificates.values()]
        broken = {(t.source, t.line) for t in self.certificates.values() if t.state_graph in self.broken_graphs}
        for v in check_internal_issued_state(self.issued, self.graphs, refs):
            if v.field_path == "state_graph" and (v.source, v.line) in broken:
                continue                            # its graph file is broken: reported there
            if v.field_path in ("state_graph", "internal_issued_state") and v.source != "configuration":
                # Point at the key itself rather than at the template's name.
                template = next((t for t in self.certificates.values()
                                 if (t.source, t.line) == (v.source, v.line)), None)
                if template is not None:
                    v = replace(v, line=template.line_of(v.field_path))
            self.violations.append(v)


class _ProcessChecks:
    """Checks of one loaded process against templates, encodings and state graphs."""

    def __init__(self, loader: _Loader, process: ProcessDefinition) -> None:
        self.l = loader
        self.p = process
        # process variable -> names of the state graphs of what it may hold
        self.certificate_vars: dict[str, set[str]] = {}
        self.card_vars: dict[str, set[str]] = {}
        self.issued_graphs: set[str] = set()        # graphs of every certificate the process issues

    def fail(self, line: int, path: str, message: str, suggestion: str | None = None) -> None:
        self.l.fail(self.p.source, line, path, message, suggestion)

    def run(self) -> None:
        steps = [(f"tasks[{i}]", t) for i, t in enumerate(self.p.tasks)]
        steps += [(f"on_error[{i}]", t) for i, t in enumerate(self.p.on_error)]
        encodings = {path: self.card_task(path, t) for path, t in steps
                     if isinstance(t, (CardProductionTask, CardOperationTask))}
        for path, t in steps:
            if isinstance(t, (ChangeStateTask, ChangeStateInCaTask, HandleIssuedTask)):
                self.state_task(path, t)
            if isinstance(t, LoadCertificatesTask) and t.template and t.template not in self.l.certificates:
                self.fail(t.line, f"{path}.template", f"unknown certificate template {t.template!r}",
                          suggest(t.template, self.l.certificates))
        for i, t in enumerate(self.p.tasks):
            encoding = encodings.get(f"tasks[{i}]")
            if encoding is not None:
                self.revoke_on_issue(f"tasks[{i}]", t, encoding, self.p.tasks[i + 1:])

    def card_task(self, path: str, task: CardProductionTask | CardOperationTask) -> EncodingDescription | None:
        template = self.l.cards.get(task.card_template) if task.card_template else None
        if task.card_template and template is None:
            return None                             # unknown (reported by load_process) or broken
        name = template.encoding if template is not None else (
            task.encoding if isinstance(task, CardOperationTask) else None)
        if name is None:
            return None
        if template is None and name not in self.l.encoding_names:
            self.fail(task.line, f"{path}.encoding", f"no encoding description {name!r} (a file encodings/{name}.ini;"
                      f" known: {', '.join(sorted(self.l.encoding_names)) or 'none'})",
                      suggest(name, self.l.encoding_names))
        encoding = self.l.encodings.get(name)
        if encoding is None:
            return None                             # missing or broken: reported already
        # C13: return fields mapped to ${variable}, input fields given, no undeclared field.
        found = check_field_mapping(encoding, task.fields, self.p.source,
                                    line_of=lambda n: task.field_lines.get(n, task.line))
        self.l.adopt(replace(v, field_path=f"{path}.{v.field_path}") for v in found)
        if isinstance(task, CardProductionTask) and task.card and template is not None:
            self.card_vars.setdefault(task.card, set()).add(template.state_graph)
        for app in encoding.applications:
            certificate = self.l.certificates.get(app.certificate_template or "")
            if not app.issues_certificate or certificate is None:
                continue
            self.issued_graphs.add(certificate.state_graph)
            self.content_variables(path, task, certificate)
            variable = process_variable_of(task.fields.get(app.return_field, "")) if app.return_field else None
            if variable is not None:
                self.certificate_vars.setdefault(variable, set()).add(certificate.state_graph)
        return encoding

    def content_variables(self, path: str, task: TaskDefinition, certificate: CertificateTemplate) -> None:
        """A certificate's subject and subjectAltNames read only the built-in variables and the
        process's inputs, never a secret one; reported at the template's line, naming the process."""
        self.l.issued_by_processes.add(certificate.name)
        given = [n for n in self.p.inputs if n not in self.p.secret_inputs]
        known = sorted({*given, *BUILTIN_VARIABLES})
        for key, rules in (("subject", [certificate.subject] if certificate.subject else []),
                           ("subject_alt_names", certificate.subject_alt_names)):
            for variable in dict.fromkeys(v for rule in rules for v in rule.variables):
                if variable in known:
                    continue
                why = ("is a secret input of" if variable in self.p.secret_inputs
                       else "is neither built in nor an input of")
                self.l.fail(certificate.source, certificate.line_of(key), key,
                            f"certificate template {certificate.name!r}: variable {variable!r} {why} process "
                            f"{self.p.name!r} ({self.p.source}:{task.line}, {path}), which issues it "
                            f"(known: {', '.join(known)})",
                            None if variable in self.p.secret_inputs else suggest(variable, known))

    def graphs_for(self, variable: str | None, kind: str, default: set[str] | None = None) -> list[StateGraph]:
        names = (self.certificate_vars if kind == "certificate" else self.card_vars).get(variable or "")
        if names is None:
            names = default
        if names is None:                           # not traceable: any graph of that kind
            return [g for g in self.l.graphs.values() if g.kind == kind]
        return [self.l.graphs[n] for n in sorted(names) if n in self.l.graphs]

    def state_task(self, path: str, task: ChangeStateTask | ChangeStateInCaTask | HandleIssuedTask) -> None:
        if isinstance(task, HandleIssuedTask):
            state, key, kind = task.target_state, "target_state", "certificate"
            graphs = self.graphs_for(task.certificates, kind, None if task.certificates else self.issued_graphs)
        else:
            state, key = task.state, "state"
            card = task.card if isinstance(task, ChangeStateTask) else None
            kind = "card" if card else "certificate"
            graphs = self.graphs_for(card if kind == "card" else task.certificates, kind)
        if not state or self.l.graph_files_broken:
            return
        where = f"{path}.{key}"
        if kind == "certificate" and state == self.l.issued:
            self.fail(task.line, where, f"{state!r} is the internal issued state ({INTERNAL_ISSUED_STATE_KEY}); "
                      "a task cannot move a certificate there (C14: it is used for nothing else)")
            return
        lacking = [g for g in graphs if state not in g.states]
        if graphs and len(lacking) == len(graphs):
            states = sorted({s for g in graphs for s in g.states})
            names = ", ".join(repr(g.name) for g in graphs)
            self.fail(task.line, where, f"state {state!r} is not a state of {names} (the {kind} state "
                      f"graph{'s' if len(graphs) != 1 else ''} this task concerns)", suggest(state, states))
            return
        if self.traced(task, kind):             # every graph listed really concerns the task
            for g in lacking:
                self.fail(task.line, where, f"state {state!r} is not a state of the {kind} state graph "
                          f"{g.name!r}, which some of the objects this task concerns follow",
                          suggest(state, g.states))
        if isinstance(task, HandleIssuedTask) and task.target_state:
            for g in graphs:
                if task.target_state not in g.states or task.target_state == g.start:
                    continue
                t = g.transition(g.start, task.target_state)
                if t is None:
                    self.fail(task.line, where, f"state graph {g.name!r} has no transition from the start state "
                              f"{g.start!r} to {task.target_state!r}; handle_issued moves a certificate "
                              f"{self.l.issued} → {g.start} → {task.target_state}")
                elif t.reasons and task.revoke_reason not in t.reasons:
                    self.fail(task.line, where, f"the transition {g.start} → {task.target_state} of state graph "
                              f"{g.name!r} needs one of the reasons {', '.join(t.reasons)}; handle_issued gives "
                              f"its revoke_reason ({task.revoke_reason or 'none'})")

    def traced(self, task, kind: str) -> bool:
        variable = task.card if kind == "card" else task.certificates
        return variable is not None and variable in (self.card_vars if kind == "card" else self.certificate_vars)

    def revoke_on_issue(self, path: str, task: TaskDefinition, encoding: EncodingDescription,
                        later: tuple[TaskDefinition, ...]) -> None:
        """C6: the CA holds a revokeOnIssue certificate, the store puts it in its start state;
        unless that is a hold state, the process must change its state itself."""
        assert isinstance(task, (CardProductionTask, CardOperationTask))
        for app in encoding.applications:
            if not (app.revoke_on_issue and app.issues_certificate):
                continue
            certificate = self.l.certificates.get(app.certificate_template or "")
            graph = self.l.graphs.get(certificate.state_graph) if certificate else None
            if graph is None or graph.states[graph.start].ca_action == CERTIFICATE_HOLD:
                continue
            assert certificate is not None  # its graph was found
            variable = process_variable_of(task.fields.get(app.return_field, "")) if app.return_field else None
            if variable is not None and any(isinstance(t, (ChangeStateTask, ChangeStateInCaTask))
                                            and t.certificates == variable for t in later):
                continue
            holds = [s.name for s in graph.states.values() if s.ca_action == CERTIFICATE_HOLD]
            to = f" to a hold state ({', '.join(holds)})" if holds else ""
            if variable is not None:
                need = f"add a change_state task for \"${{{variable}}}\"{to} after this task"
            else:
                need = (f"give {app.name} CertCoreObjectDescriptorReturnField, map it to a process variable and "
                        f"add a change_state task for that variable{to} after this task")
            self.l.warn(self.p.source, task.line, path,
                        f"{encoding.source}:{app.line_of('revokeOnIssue')}: {app.name} has revokeOnIssue=true, "
                        f"so the CA puts certificate template {certificate.name!r}'s certificate on hold "
                        f"(certificateHold), but the store moves it to the start state {graph.start!r} of "
                        f"{graph.name!r}, which is not a hold state (C6); {need}")


def _declared_name(text: str) -> str | None:
    """The `name:` of a state graph file that did not load, if it can be read at all."""
    try:
        data = yaml.safe_load(text)
    except Exception:     # any failure just means the name is unknown
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _ordered(violations: Iterable[Violation]) -> list[Violation]:
    unique = dict.fromkeys(violations)              # the same problem found twice is listed once
    return sorted(unique, key=lambda v: (v.source, v.line, v.field_path, v.message))


def describe(configuration: Configuration) -> Mapping[str, int]:
    """Counts per kind, for a start-up log line."""
    return {"state_graphs": len(configuration.graphs),
            "certificate_templates": len(configuration.templates.certificates),
            "card_templates": len(configuration.templates.cards), "encodings": len(configuration.encodings),
            "processes": len(configuration.processes), "warnings": len(configuration.warnings)}
