"""Settings of both servers: command-line flags over environment variables over a YAML file.

Environment variables are prefixed CARDLINE_ORCHESTRATOR_ / CARDLINE_GATEWAY_ (nested keys
with "__"). The YAML file is given with --config or CARDLINE_CONFIG. Every violation is
reported at once (pydantic collects them all).
"""
from __future__ import annotations

import contextvars
import os
import pathlib
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.errors import ConfigurationError


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the section of the YAML configuration file named by the settings class."""

    def __init__(self, settings_cls: type[BaseSettings], path: pathlib.Path | None, section: str):
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigurationError(f"{path}: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigurationError(f"{path}: expected a mapping at the top level")
            self._data = loaded.get(section, {}) or {}

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_CONFIG_FILE: contextvars.ContextVar[pathlib.Path | None] = contextvars.ContextVar("config_file", default=None)


class _Settings(BaseSettings):
    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        path = _CONFIG_FILE.get() or (pathlib.Path(os.environ["CARDLINE_CONFIG"])
                                      if os.environ.get("CARDLINE_CONFIG") else None)
        yaml_source = _YamlSource(settings_cls, path, cls.model_config["title"])
        return (init_settings, env_settings, yaml_source)


class OrchestratorSettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="CARDLINE_ORCHESTRATOR_", env_nested_delimiter="__",
                                      title="orchestrator", extra="forbid")

    listen: str = "127.0.0.1:7400"
    data_dir: pathlib.Path = pathlib.Path("var/orchestrator")
    database_url: str = ""          # empty: sqlite:///<data_dir>/cardline.db
    step_timeout_s: float = Field(default=120.0, gt=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    insecure: bool = True           # plaintext gRPC (development); mTLS comes with the pool issue

    _check = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'cardline.db'}"


class GatewaySettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="CARDLINE_GATEWAY_", env_nested_delimiter="__",
                                      title="gateway", extra="forbid")

    gateway_id: str = Field(default_factory=lambda: os.uname().nodename)
    site: str = ""
    labels: dict[str, str] = {}
    listen: str = "127.0.0.1:7401"
    data_dir: pathlib.Path = pathlib.Path("var/gateway")
    orchestrator: str = ""          # HOST:PORT to dial out to; empty: no link
    pkcs11_modules: list[pathlib.Path] = []
    pcsc: bool = True               # watch PC/SC readers (needs pcscd)
    insecure: bool = True
    reconnect_min_s: float = Field(default=0.2, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)

    _check = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("orchestrator")
    @classmethod
    def _check_orchestrator(cls, v: str) -> str:
        return _check_listen(v) if v else v


def load(settings_cls: type[_Settings], config_file: pathlib.Path | None = None, **overrides: Any):
    """Builds settings (flags > environment > YAML file > defaults), turning every validation
    error into one ConfigurationError that lists them all."""
    token = _CONFIG_FILE.set(config_file)
    try:
        return settings_cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        where = f" in {config_file or os.environ.get('CARDLINE_CONFIG')}" if (config_file or os.environ.get("CARDLINE_CONFIG")) else ""
        raise ConfigurationError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None
    finally:
        _CONFIG_FILE.reset(token)
