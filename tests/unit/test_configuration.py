"""The configuration directory is loaded as a whole: every violation of every file is listed
in one ConfigurationError, located by file and line; cross-file rules (C6 warning, C13,
C14/C15) are checked at load time; the internal issued state comes from the settings, also
under the founding document's exact key."""
from __future__ import annotations

import pathlib
import re
import shutil

import pytest

from orchestrator.domain.issued_state import INTERNAL_ISSUED_STATE_KEY
from orchestrator.services.configuration import Configuration, RejectedConfiguration, load_configuration
from shared import config
from shared.errors import ConfigurationError

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
CUSTOM = "MyCustomState"


@pytest.fixture
def conf(tmp_path) -> pathlib.Path:
    """A copy of examples/ the test may change."""
    target = tmp_path / "config"
    shutil.copytree(EXAMPLES, target, ignore=shutil.ignore_patterns("README*"))
    return target


def edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def line_of(path: pathlib.Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def rejected(conf: pathlib.Path, **kwargs) -> RejectedConfiguration:
    with pytest.raises(RejectedConfiguration) as err:
        load_configuration(conf, **kwargs)
    error = err.value
    assert error.violations
    # One line per violation after the header, each "file:line: field: message".
    assert str(error).count("\n") == len(error.violations)
    assert error.message.splitlines()[1:] == [str(v) for v in error.violations]
    return error


def messages(error: RejectedConfiguration) -> list[str]:
    return [str(v) for v in error.violations]


def use_custom_issued_state(conf: pathlib.Path) -> None:
    graph = conf / "state-graphs" / "certificate.yaml"
    edit(graph, "  Issued: {}", f"  {CUSTOM}: {{}}")
    edit(graph, "{from: Issued, to: Active}", f"{{from: {CUSTOM}, to: Active}}")
    for templates in (conf / "templates").glob("*.yaml"):
        templates.write_text(templates.read_text().replace("internal_issued_state: Issued",
                                                           f"internal_issued_state: {CUSTOM}"))


# -- the examples ----------------------------------------------------------------------


def test_examples_load_without_violation():
    configuration = load_configuration(EXAMPLES)
    assert isinstance(configuration, Configuration)
    assert configuration.warnings == ()
    assert set(configuration.graphs) == {"EmployeeCertificate", "EmployeeCard"}
    assert set(configuration.encodings) == {"employee-card", "employee-card-with-recovery", "change-pin",
                                            "unblock-pin", "renew-certificates", "temporary-card", "erase-card"}
    assert set(configuration.processes) == {"produce-employee-card", "renew-authentication", "change-pin",
                                            "unblock-pin", "renew-certificates", "replace-card",
                                            "issue-temporary-card", "restore-card", "lock-card",
                                            "unlock-card", "report-lost", "retire-card"}
    templates = configuration.templates
    assert templates.internal_issued_state == "Issued"
    assert {t.start_state for t in templates.certificates.values()} == {"Active"}
    assert templates.card("EmployeeCard").initial_state == "InProduction"
    assert templates.card("EmployeeCardWithRecovery").encoding == "employee-card-with-recovery"


def test_default_settings_point_at_the_examples(monkeypatch):
    monkeypatch.delenv(INTERNAL_ISSUED_STATE_KEY, raising=False)
    settings = config.load(config.OrchestratorSettings)
    assert settings.config_dir == EXAMPLES
    assert settings.certificate_internal_issued_state == "Issued"
    assert settings.default_relation_type == "HAS_CERTIFICATE"
    assert settings.issued_sweeper.enabled is False
    assert settings.key_archive.kind == "file"
    load_configuration(settings.config_dir, internal_issued_state=settings.certificate_internal_issued_state)


# -- C14 / C15 ---------------------------------------------------------------------------


def test_c14_custom_issued_state_violations_stop_start_up_all_listed():
    error = rejected(EXAMPLES, internal_issued_state=CUSTOM)
    text = "\n".join(messages(error))
    graph = EXAMPLES / "state-graphs" / "certificate.yaml"
    templates = EXAMPLES / "templates" / "templates.yaml"
    temporary = EXAMPLES / "templates" / "temporary-card.yaml"
    # The graph lacks the state (and its old internal state is now unreachable) ...
    assert f"{graph}:{line_of(graph, 'name:')}: states: certificate state graph 'EmployeeCertificate': lacks " \
           f"the internal issued state {CUSTOM!r}" in text
    assert f"{graph}:{line_of(graph, '  Issued:')}: states.Issued: state 'Issued' is unreachable" in text
    # ... and every certificate template configures another one: all four listed, each at its line.
    for path, name in ((templates, "EmployeeAuthentication"), (templates, "EmployeeSignature"),
                       (templates, "EmployeeEncryption"), (temporary, "EmployeeTemporaryAuthentication")):
        assert re.search(rf"{re.escape(str(path))}:\d+: internal_issued_state: certificate template "
                         rf"'{name}': configures the internal issued state 'Issued', but "
                         rf"{re.escape(INTERNAL_ISSUED_STATE_KEY)} is '{CUSTOM}'", text), name
    assert len(error.violations) == 6


def test_c14_custom_issued_state_accepted_when_graphs_and_templates_follow(conf):
    use_custom_issued_state(conf)
    configuration = load_configuration(conf, internal_issued_state=CUSTOM)
    assert configuration.templates.internal_issued_state == CUSTOM
    assert {t.internal_issued_state for t in configuration.templates.certificates.values()} == {CUSTOM}
    assert configuration.internal_issued_state == CUSTOM


def test_c14_issued_state_from_environment_variable_with_dotted_name(conf, monkeypatch):
    use_custom_issued_state(conf)
    monkeypatch.setenv(INTERNAL_ISSUED_STATE_KEY, CUSTOM)      # as docker-compose passes it
    settings = config.load(config.OrchestratorSettings, config_dir=conf)
    assert settings.certificate_internal_issued_state == CUSTOM
    configuration = load_configuration(settings.config_dir,
                                       internal_issued_state=settings.certificate_internal_issued_state)
    assert configuration.templates.internal_issued_state == CUSTOM
    # The unchanged examples do not follow it: start-up is refused.
    with pytest.raises(ConfigurationError, match="lacks the internal issued state 'MyCustomState'"):
        load_configuration(EXAMPLES, internal_issued_state=settings.certificate_internal_issued_state)


@pytest.mark.parametrize("where", ["top", "section"])
def test_c14_issued_state_from_the_config_file_with_dotted_name(tmp_path, monkeypatch, where):
    monkeypatch.delenv(INTERNAL_ISSUED_STATE_KEY, raising=False)
    path = tmp_path / "cardline.yaml"
    line = f'"{INTERNAL_ISSUED_STATE_KEY}": {CUSTOM}\n'
    path.write_text(line + "orchestrator: {}\n" if where == "top" else "orchestrator:\n  " + line)
    assert config.load(config.OrchestratorSettings, config_file=path).certificate_internal_issued_state == CUSTOM


def test_c14_issued_state_prefixed_environment_variable(monkeypatch):
    monkeypatch.delenv(INTERNAL_ISSUED_STATE_KEY, raising=False)
    monkeypatch.setenv("CARDLINE_ORCHESTRATOR_CERTIFICATE_INTERNAL_ISSUED_STATE", CUSTOM)
    assert config.load(config.OrchestratorSettings).certificate_internal_issued_state == CUSTOM


def test_c14_two_spellings_that_disagree_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(INTERNAL_ISSUED_STATE_KEY, raising=False)
    path = tmp_path / "cardline.yaml"
    path.write_text(f'"{INTERNAL_ISSUED_STATE_KEY}": A\norchestrator:\n  certificate_internal_issued_state: B\n')
    with pytest.raises(ConfigurationError, match="different values"):
        config.load(config.OrchestratorSettings, config_file=path)
    monkeypatch.setenv(INTERNAL_ISSUED_STATE_KEY, "A")
    monkeypatch.setenv("CARDLINE_ORCHESTRATOR_CERTIFICATE_INTERNAL_ISSUED_STATE", "B")
    with pytest.raises(ConfigurationError, match="disagree"):
        config.load(config.OrchestratorSettings)


def test_c14_empty_issued_state_is_refused(monkeypatch):
    monkeypatch.setenv(INTERNAL_ISSUED_STATE_KEY, " ")
    with pytest.raises(ConfigurationError, match="certificate_internal_issued_state"):
        config.load(config.OrchestratorSettings)


def test_c14_template_without_issued_state_is_refused(conf):
    templates = conf / "templates" / "templates.yaml"
    edit(templates, "    internal_issued_state: Issued\n\n  - name: EmployeeSignature",
         "\n  - name: EmployeeSignature")
    error = rejected(conf)
    assert messages(error) == [f"{templates}:{line_of(templates, 'EmployeeAuthentication')}: internal_issued_state: "
                               "certificate template 'EmployeeAuthentication': does not configure the internal "
                               f"issued state; it must be 'Issued' ({INTERNAL_ISSUED_STATE_KEY})"]


def test_c15_transition_from_issued_to_start_state_is_required(conf):
    graph = conf / "state-graphs" / "certificate.yaml"
    edit(graph, "  - {from: Issued, to: Active}                   # taken when the task succeeds (C2)\n", "")
    error = rejected(conf)
    assert any("needs a transition from the internal issued state 'Issued' to the start state 'Active'" in m
               for m in messages(error))


def test_c14_a_task_cannot_move_a_certificate_into_the_issued_state(conf):
    process = conf / "processes" / "produce-employee-card.yaml"
    edit(process, "    card: \"${card}\"             # the produced card's CoreObjectDescriptor\n",
         "    card: \"${card}\"\n  - type: change_state\n    certificates: \"${theGeneratedCertificate}\"\n"
         "    state: Issued\n")
    error = rejected(conf)
    assert [m for m in messages(error) if "tasks[1].state" in m] == [
        f"{process}:{line_of(process, 'type: change_state')}: tasks[1].state: 'Issued' is the internal issued state "
        f"({INTERNAL_ISSUED_STATE_KEY}); a task cannot move a certificate there (C14: it is used for nothing else)"]


# -- C13 ---------------------------------------------------------------------------------


def test_c13_process_mapping_return_field_to_literal_rejected_with_process_line(conf):
    process = conf / "processes" / "produce-literal.yaml"
    process.write_text("""\
name: produce-literal
inputs: [pin]
secret_inputs: [pin]
tasks:
  - type: card_production
    card_template: EmployeeCard
    fields:
      USER_PIN: "${pin}"
      GeneratedCertApp_A: theGeneratedCertificate
""")
    error = rejected(conf)
    assert messages(error) == [
        f"{process}:9: tasks[0].fields.GeneratedCertApp_A: return field 'GeneratedCertApp_A' must be mapped to a "
        "process variable written ${name}, not 'theGeneratedCertificate' (did you mean '${theGeneratedCertificate}'?)"]


def test_c13_unmapped_return_field_and_undeclared_field_rejected(conf):
    process = conf / "processes" / "renew-authentication.yaml"
    edit(process, '      GeneratedCertApp_A: "${renewedCertificate}"',
         '      GeneratedCertApp_B: "${renewedCertificate}"')
    error = rejected(conf)
    text = "\n".join(messages(error))
    assert f"{process}:{line_of(process, 'GeneratedCertApp_B')}: tasks[0].fields.GeneratedCertApp_B: field " \
           "'GeneratedCertApp_B' is not declared in [Fields]" in text
    assert "(did you mean 'GeneratedCertApp_A'?)" in text
    assert "tasks[0].fields.GeneratedCertApp_A: return field 'GeneratedCertApp_A' " \
           "(CertCoreObjectDescriptorReturnField) is not mapped" in text


def test_c13_card_operation_with_named_encoding_is_checked(conf):
    process = conf / "processes" / "recover.yaml"
    process.write_text("""\
name: recover
inputs: [card, old, pin]
secret_inputs: [pin]
tasks:
  - type: card_operation
    encoding: employee-card-with-recovery
    card: "${card}"
    fields:
      USER_PIN: "${pin}"
      OldEncryptionCert: "${old}"
""")
    error = rejected(conf)
    assert messages(error) == [f"{process}:5: tasks[0].fields.NewEncryptionCert: return field 'NewEncryptionCert' "
                               "(CertCoreObjectDescriptorReturnField) is not mapped; map it to a process variable, "
                               "e.g. NewEncryptionCert: \"${newEncryptionCert}\""]
    edit(process, "encoding: employee-card-with-recovery", "encoding: employee-card-with-recovry")
    assert any("tasks[0].encoding: no encoding description 'employee-card-with-recovry'" in m
               and "(did you mean 'employee-card-with-recovery'?)" in m for m in messages(rejected(conf)))


# -- C6 ----------------------------------------------------------------------------------


def test_c6_revoke_on_issue_without_change_state_warns(conf):
    encoding = conf / "encodings" / "employee-card.ini"
    edit(encoding, "revokeOnIssue=false", "revokeOnIssue=true")
    configuration = load_configuration(conf)
    produce = conf / "processes" / "produce-employee-card.yaml"
    renew = conf / "processes" / "renew-authentication.yaml"
    replace = conf / "processes" / "replace-card.yaml"          # produces an EmployeeCard too
    warnings = configuration.warnings
    assert len(warnings) == 3, warnings
    produce_warning = next(w for w in warnings if w.startswith(str(produce)))
    assert produce_warning.startswith(f"{produce}:{line_of(produce, 'type: card_production')}: tasks[0]: "
                                      f"{encoding}:{line_of(encoding, 'revokeOnIssue')}: Application_A has "
                                      "revokeOnIssue=true")
    assert "start state 'Active' of 'EmployeeCertificate', which is not a hold state (C6)" in produce_warning
    assert 'add a change_state task for "${theGeneratedCertificate}" to a hold state (OnHold)' in produce_warning
    assert any(w.startswith(str(renew)) and "${renewedCertificate}" in w for w in warnings)

    # A change_state for that certificate after the task silences the warning for that process.
    edit(produce, "    card: \"${card}\"             # the produced card's CoreObjectDescriptor\n",
         "    card: \"${card}\"\n  - type: change_state\n    certificates: \"${theGeneratedCertificate}\"\n"
         "    state: OnHold\n    reason: suspended\n")
    warnings = load_configuration(conf).warnings
    assert len(warnings) == 2 and {w.split(":")[0] for w in warnings} == {str(renew), str(replace)}


def test_c6_no_warning_when_the_start_state_is_a_hold_state(conf):
    edit(conf / "encodings" / "employee-card.ini", "revokeOnIssue=false", "revokeOnIssue=true")
    graph = conf / "state-graphs" / "certificate.yaml"
    edit(graph, "start: Active", "start: OnHold")
    edit(graph, "{from: Issued, to: Active}", "{from: Issued, to: OnHold}")
    # The example processes' error path moves Issued -> start -> Revoked.
    edit(graph, "{from: [Active, OnHold], to: Revoked, reasons: [keyCompromise, cardLost, cardStolen, "
                "cessationOfOperation]}", "{from: [Active, OnHold], to: Revoked}")
    # ... and so does the lost card's move of its certificates (they follow the card to Revoked).
    edit(conf / "state-graphs" / "card.yaml", "{state: Revoked, reason: keyCompromise}", "{state: Revoked}")
    configuration = load_configuration(conf)
    assert not [w for w in configuration.warnings if "revokeOnIssue" in w]


# -- every violation, everywhere ---------------------------------------------------------


def test_every_violation_across_files_listed_not_only_the_first(conf):
    graph = conf / "state-graphs" / "card.yaml"
    edit(graph, "    to: Retired\n", "    to: Retird\n")
    templates = conf / "templates" / "templates.yaml"
    edit(templates, "    validity_days: 730\n    key_usage: [keyEncipherment]",
         "    validity_days: 730\n    key_usages: [keyEncipherment]")
    encoding = conf / "encodings" / "employee-card.ini"
    edit(encoding, "KeyLabel=Authentication", "KeyLable=Authentication")
    process = conf / "processes" / "renew-authentication.yaml"
    edit(process, "type: card_operation", "type: card_operaton")
    edit(process, "revoke_reason: cessationOfOperation", "revoke_reason: cessationOfOperations")
    error = rejected(conf)
    text = str(error)
    for path in (graph, templates, encoding, process):
        assert str(path) in text, path
    expected = [
        f"{graph}:{line_of(graph, 'Retird')}: transitions[5].to: state 'Retird' is not declared in states "
        "(did you mean 'Retired'?)",
        f"{templates}:{line_of(templates, 'key_usages')}: certificate_templates[2].key_usages: unknown key "
        "'key_usages'",
        f"{encoding}:{line_of(encoding, 'KeyLable')}: Application_A.KeyLable: unknown keyword 'KeyLable' in "
        "[Application_A] (did you mean 'KeyLabel'?)",
        f"{process}:{line_of(process, 'card_operaton')}: tasks[0].type: unknown task type 'card_operaton' "
        "(did you mean 'card_operation'?)",
        f"{process}:{line_of(process, 'cessationOfOperations')}: on_error[0].revoke_reason: unknown revocation "
        "reason 'cessationOfOperations' (did you mean 'cessationOfOperation'?)",
    ]
    for start in expected:
        assert any(m.startswith(start) for m in messages(error)), start
    # The broken card graph does not make the card templates that name it fail as well.
    assert not any("does not exist" in m for m in messages(error))


def test_unknown_template_in_encoding_suggests_name(conf):
    encoding = conf / "encodings" / "employee-card.ini"
    edit(encoding, "CertificateTemplate=EmployeeAuthentication", "CertificateTemplate=EmployeeAuthentcation")
    error = rejected(conf)
    assert messages(error) == [
        f"{encoding}:{line_of(encoding, 'EmployeeAuthentcation')}: Application_A.CertificateTemplate: unknown "
        "certificate template 'EmployeeAuthentcation' (did you mean 'EmployeeAuthentication'?)"]


def test_templates_name_existing_graphs_encodings_states_and_cas(conf):
    templates = conf / "templates" / "templates.yaml"
    text = templates.read_text()
    text = text.replace("    ca: local\n    key_type: RSA_2048", "    ca: lcoal\n    key_type: RSA_2048", 1)
    text = text.replace("state_graph: EmployeeCertificate\n    internal_issued_state: Issued\n\ncard_templates",
                        "state_graph: EmployeeCard\n    internal_issued_state: Issued\n\ncard_templates")
    text = text.replace("encoding: employee-card                    #", "encoding: employee_card  #")
    text = text.replace("    produced_state: Active\n    failed_state: ProductionFailed\n\n",
                        "    produced_state: Actve\n    failed_state: Lost\n\n")
    text = text.replace("    state_graph: EmployeeCard\n    encoding: employee-card-with",
                        "    state_graph: EmployeeCertificate\n    encoding: employee-card-with")
    templates.write_text(text)
    found = {m.split(": ", 2)[1] + ": " + m.split(": ", 2)[2] for m in messages(rejected(conf))}
    assert ("ca: certificate template 'EmployeeSignature': unknown CA 'lcoal' (configured CAs: local) "
            "(did you mean 'local'?)") in found
    assert ("state_graph: certificate template 'EmployeeEncryption': names the state graph 'EmployeeCard', "
            "which is a card state graph, not a certificate state graph") in found
    assert any(m.startswith("encoding: card template 'EmployeeCard': no encoding description 'employee_card'")
               and m.endswith("(did you mean 'employee-card'?)") for m in found)
    assert ("produced_state: card template 'EmployeeCard': state 'Actve' is not a state of the card state graph "
            "'EmployeeCard' (did you mean 'Active'?)") in found
    assert ("failed_state: card template 'EmployeeCard': the card state graph 'EmployeeCard' has no transition from "
            "its start state 'InProduction' to 'Lost', which a production ends in") in found
    assert ("state_graph: card template 'EmployeeCardWithRecovery': names the state graph 'EmployeeCertificate', "
            "which is a certificate state graph, not a card state graph") in found
    assert len(found) == 6


def test_process_states_are_checked_against_the_graph_of_their_objects(conf):
    process = conf / "processes" / "produce-employee-card.yaml"
    edit(process, "    card: \"${card}\"             # the produced card's CoreObjectDescriptor\n",
         "    card: \"${card}\"\n  - type: change_state\n    card: \"${card}\"\n    state: OnHold\n")
    edit(conf / "processes" / "renew-authentication.yaml", "target_state: Revoked", "target_state: Revokd")
    found = messages(rejected(conf))
    assert any("tasks[1].state: state 'OnHold' is not a state of 'EmployeeCard' (the card state graph this task "
               "concerns)" in m for m in found)
    assert any("on_error[0].target_state: unknown state 'Revokd' (did you mean 'Revoked'?)" in m for m in found)
    assert len(found) == 2


def test_handle_issued_target_needs_a_transition_its_reason_allows(conf):
    graph = conf / "state-graphs" / "certificate.yaml"
    edit(graph, "reasons: [keyCompromise, cardLost, cardStolen, cessationOfOperation]",
         "reasons: [keyCompromise, cardLost, cardStolen]")
    found = messages(rejected(conf))
    assert len(found) == 5                  # the error paths of 5 example processes
    assert all("on_error[0].target_state: the transition Active → Revoked of state graph 'EmployeeCertificate' "
               "needs one of the reasons keyCompromise, cardLost, cardStolen; handle_issued gives its revoke_reason "
               "(cessationOfOperation)" in m for m in found)


def test_missing_directories_and_duplicates_are_reported(conf, tmp_path):
    with pytest.raises(ConfigurationError, match="configuration directory does not exist"):
        load_configuration(tmp_path / "nowhere")
    shutil.copy(conf / "templates" / "templates.yaml", conf / "templates" / "more.yaml")
    shutil.copy(conf / "state-graphs" / "card.yaml", conf / "state-graphs" / "card2.yml")
    found = messages(rejected(conf))
    assert sum("is already defined in" in m for m in found) == 6      # 3 + 2 templates, 1 graph
    shutil.rmtree(conf / "state-graphs")
    assert any("directory missing" in m for m in messages(rejected(conf)))


def test_encoding_warnings_are_passed_on(conf):
    encoding = conf / "encodings" / "employee-card.ini"
    edit(encoding, "GenerateKeyPair=RSA_2048\nCertificateTemplate=EmployeeSignature",
         "GenerateKeyPair=EC_P256\nCertificateTemplate=EmployeeSignature")
    warnings = load_configuration(conf).warnings
    assert warnings == (f"{encoding}:{line_of(encoding, 'Application_B') + 5}: Application_B.GenerateKeyPair: "
                        "generates a key of type EC_P256, but certificate template 'EmployeeSignature' says "
                        "key_type RSA_2048; "
                        "the encoding's key type is used",)
