"""`cardline check-config` and `cardline db upgrade`: an operator's checks and steps that
run without a running orchestrator."""
from __future__ import annotations

import pathlib

import typer

from orchestrator.cli.client import JSON, console, print_json
from shared.cli import CliFail
from shared.pki_cli import INSECURE, TLS_DIR

CONFIG_FILE = typer.Option(None, "--config", envvar="CARDLINE_CONFIG",
                           help="YAML configuration file (section 'orchestrator').")
DATA_DIR = typer.Option(None, "--data-dir", help="Directory for the SQLite store and the local CA.")
DATABASE_URL = typer.Option(None, "--database-url", help="SQLAlchemy URL (default: SQLite in --data-dir).")


def _lines(exc: Exception) -> list[str]:
    """Every violation of a ConfigurationError, one per entry (its first line is a heading)."""
    violations = getattr(exc, "violations", None)
    if isinstance(violations, tuple):
        return [str(v) for v in violations]
    text = getattr(exc, "message", str(exc))
    head, *rest = text.splitlines()
    return [line.strip() for line in rest if line.strip()] or [head]


def check(config_file: pathlib.Path | None, overrides: dict) -> tuple[list[str], list[str], dict[str, int]]:
    """(violations, warnings, counts) of the settings and the configuration directory they
    name. Reads files only: no database is opened, no CA or directory created."""
    from orchestrator.ca.registry import ca_names
    from orchestrator.services.configuration import load_configuration
    from shared import config
    from shared.errors import ConfigurationError
    from shared.tls import settings_tls

    violations: list[str] = []
    try:
        settings = config.load(config.OrchestratorSettings, config_file=config_file, **overrides)
    except ConfigurationError as exc:
        violations.extend(f"settings: {line}" for line in _lines(exc))
        # Go on with the defaults (and the directory given), unvalidated: the directory's
        # problems are listed too.
        settings = config.OrchestratorSettings.model_construct(
            **({"config_dir": overrides["config_dir"]} if overrides.get("config_dir") else {}))
    try:
        if not settings.insecure:       # (insecure: no TLS files to check)
            settings_tls(settings, "orchestrator", "orchestrator", role="orchestrator")
    except ConfigurationError as exc:
        violations.extend(f"TLS: {line}" for line in _lines(exc))
    known_cas: tuple[str, ...] = ("local",)
    try:
        known_cas = ca_names(settings.cas)
    except ConfigurationError as exc:
        violations.extend(f"settings: {line}" for line in _lines(exc))
    warnings: list[str] = []
    counts: dict[str, int] = {}
    try:
        loaded = load_configuration(settings.config_dir, known_cas=known_cas,
                                    internal_issued_state=settings.certificate_internal_issued_state,
                                    secrets_dir=settings.effective_secrets_dir())
        warnings = list(loaded.warnings)
        counts = {"state_graphs": len(loaded.graphs), "card_templates": len(loaded.templates.cards),
                  "certificate_templates": len(loaded.templates.certificates), "encodings": len(loaded.encodings),
                  "processes": len(loaded.processes), "cas": len(known_cas)}
    except ConfigurationError as exc:
        violations.extend(_lines(exc))
    return violations, warnings, counts


def register(root: typer.Typer) -> None:
    @root.command("check-config")
    def check_config(
        config_dir: pathlib.Path | None = typer.Option(None, help="Directory of state graphs, templates, "
                                                                  "encodings and processes."),
        config_file: pathlib.Path | None = CONFIG_FILE,
        data_dir: pathlib.Path | None = DATA_DIR, database_url: str | None = DATABASE_URL,
        tls_dir: pathlib.Path | None = TLS_DIR, insecure: bool | None = INSECURE,
        json_output: bool = JSON,
    ) -> None:
        """Check the orchestrator's settings and configuration directory without touching the
        database or a CA: exit 0 when start-up would accept them, 1 with every violation listed."""
        violations, warnings, counts = check(config_file, {"config_dir": config_dir, "data_dir": data_dir,
                                                           "database_url": database_url, "tls_dir": tls_dir,
                                                           "insecure": insecure})
        if json_output:
            print_json({"ok": not violations, "violations": violations, "warnings": warnings, "counts": counts})
        else:
            for line in violations:
                print(line)
            for line in warnings:
                console.print(f"warning: {line}", markup=False, highlight=False)
            if not violations:
                print("configuration OK: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items()))
        if violations:
            raise CliFail(f"{len(violations)} violation(s) in the configuration", 1)

    db = typer.Typer(help="The orchestrator's database.", no_args_is_help=True)

    @db.command("upgrade")
    def db_upgrade(
        config_file: pathlib.Path | None = CONFIG_FILE,
        data_dir: pathlib.Path | None = DATA_DIR, database_url: str | None = DATABASE_URL,
        json_output: bool = JSON,
    ) -> None:
        """Upgrade the database schema to this release's revision (Alembic); run it before
        starting a new release (or start the orchestrator with --migrate)."""
        from orchestrator.store.store import Store, head_revision
        from shared import config

        settings = config.load(config.OrchestratorSettings, config_file=config_file, data_dir=data_dir,
                               database_url=database_url)
        store = Store(settings.effective_database_url())
        try:
            before = store.schema_revision()
            store.migrate()
            after = store.schema_revision()
            shown = store.database_url_shown
        finally:
            store.close()
        if json_output:
            print_json({"database": shown, "from_revision": before or "", "to_revision": after or "",
                        "head": head_revision()})
            return
        print(f"{shown}: " + (f"already at revision {after}" if before == after
                              else f"upgraded from {before or 'an empty database'} to revision {after}"))

    root.add_typer(db, name="db")
