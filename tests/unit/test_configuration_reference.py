"""docs/configuration.md and examples/settings.yaml cannot rot: the list of settings is
generated from the settings models (shared/config.py), so a setting added to the code and
not to the reference, or documented with another environment variable or default, fails
here; the sample settings file loads and names every setting."""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import pytest
from pydantic import BaseModel

from shared import config

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = (ROOT / "docs" / "configuration.md").read_text()
SAMPLE = ROOT / "examples" / "settings.yaml"
Server = type[config.OrchestratorSettings | config.GatewaySettings]
SERVERS: dict[str, Server] = {"Orchestrator": config.OrchestratorSettings, "Gateway": config.GatewaySettings}
#: Sample entries that deliberately differ from the default.
SAMPLE_NOT_DEFAULT = {"gateway.orchestrator"}


def leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every setting as a dotted name -> its pydantic field, nested models flattened."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found.update(leaves(kind, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = field
    return found


def documented(heading: str) -> dict[str, tuple[str, str]]:
    """Rows of the table under '## HEADING': setting -> (environment variable, default)."""
    text = REFERENCE.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+) \|", text, re.M)
    return {name: (env, default.strip()) for name, env, default in rows}


def rendered(value: Any) -> str:
    """A default as the reference writes it."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


@pytest.fixture(autouse=True)
def _no_cardline_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CARDLINE_") or k == config.INTERNAL_ISSUED_STATE_KEY]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("heading", SERVERS)
def test_every_setting_of_the_code_is_in_the_reference_and_nothing_else(heading):
    assert set(documented(heading)) == set(leaves(SERVERS[heading]))


@pytest.mark.parametrize("heading", SERVERS)
def test_reference_names_each_settings_environment_variable(heading):
    settings_cls = SERVERS[heading]
    prefix = settings_cls.model_config["env_prefix"]
    for name, (env, _) in documented(heading).items():
        assert env == prefix + name.upper().replace(".", "__"), name


@pytest.mark.parametrize("heading", SERVERS)
def test_reference_gives_each_settings_default(heading):
    for name, field in leaves(SERVERS[heading]).items():
        default = documented(heading)[name][1]
        if field.default_factory is not None:       # computed at start-up: described in words
            continue
        assert default.startswith(rendered(field.default)), f"{name}: documented {default}, code {field.default!r}"


@pytest.mark.parametrize("heading", SERVERS)
def test_each_documented_environment_variable_reaches_its_setting(heading, monkeypatch):
    settings_cls = SERVERS[heading]
    for name, (env, _) in documented(heading).items():
        field = leaves(settings_cls)[name]
        if field.annotation not in (str, float, bool, pathlib.Path, pathlib.Path | None, str | None):
            continue                                 # lists and mappings: JSON, checked below
        value = {str: "x:1" if name.endswith(("listen", "orchestrator")) else "Xy", float: "7",
                 bool: "true"}.get(field.annotation, "/somewhere")
        if name.endswith("revoke_reason"):
            value = "superseded"
        if name == "replica.stale_after_s":          # at least two default heartbeats (5 s)
            value = "17"
        monkeypatch.setenv(env, value)
        loaded: Any = config.load(settings_cls)
        for part in name.split("."):
            loaded = getattr(loaded, part)
        assert str(loaded) in {value, "7.0", "17.0", "True"}, (env, loaded)
        monkeypatch.delenv(env)


def test_list_settings_are_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("CARDLINE_GATEWAY_PKCS11_MODULES", '["/usr/lib/softhsm/libsofthsm2.so"]')
    monkeypatch.setenv("CARDLINE_GATEWAY_LABELS", '{"floor": "2"}')
    monkeypatch.setenv("CARDLINE_ORCHESTRATOR_CAS", '[{"name": "corp", "kind": "openssl", "directory": "/srv/ca"}]')
    gateway = config.load(config.GatewaySettings)
    assert [str(p) for p in gateway.pkcs11_modules] == ["/usr/lib/softhsm/libsofthsm2.so"]
    assert gateway.labels == {"floor": "2"}
    assert config.load(config.OrchestratorSettings).cas[0]["name"] == "corp"


@pytest.mark.parametrize("heading", SERVERS)
def test_sample_settings_file_loads_and_keeps_the_defaults(heading):
    settings_cls = SERVERS[heading]
    section = settings_cls.model_config["title"]
    from_sample, defaults = config.load(settings_cls, SAMPLE), config.load(settings_cls)
    for name in leaves(settings_cls):
        if f"{section}.{name}" in SAMPLE_NOT_DEFAULT:
            continue
        a, b = from_sample, defaults
        for part in name.split("."):
            a, b = getattr(a, part), getattr(b, part)
        assert a == b, f"examples/settings.yaml {section}.{name}: {a!r}, default {b!r}"


@pytest.mark.parametrize("heading", SERVERS)
def test_sample_settings_file_names_every_setting(heading):
    settings_cls = SERVERS[heading]
    section = settings_cls.model_config["title"]
    text = SAMPLE.read_text().split(f"\n{section}:\n", 1)[1]
    text = re.split(r"^\S", text, maxsplit=1, flags=re.M)[0]       # up to the next top-level key
    for name in leaves(settings_cls):
        assert re.search(rf"^\s*#?\s*{re.escape(name.rpartition('.')[2])}:", text, re.M), f"{section}.{name}"
