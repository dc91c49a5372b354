"""Settings of both servers: command-line flags over environment variables over a YAML file.

Environment variables are prefixed CARDLINE_ORCHESTRATOR_ / CARDLINE_GATEWAY_ (nested keys
with "__"). The YAML file is given with --config or CARDLINE_CONFIG. Every violation is
reported at once (pydantic collects them all).

Some settings also answer to the exact key operators know from the founding document
(`stateGraphDefinitionManager.certificateInternalIssuedState`, see ALIASES): as an
environment variable of exactly that name (docker-compose passes it like that) and as a key
of the YAML file, at the top level or in the server's section. Precedence: flags >
CARDLINE_ORCHESTRATOR_... > the exact-name environment variable > the YAML file (section key
> dotted key in the section > dotted key at the top level) > default. Two spellings of one
setting with different values in the same place (the environment, or the file) are an
error rather than a guess.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import os
import pathlib
import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from shared.errors import ConfigurationError, InvalidArgument, quoted
from shared.limits import check_duration


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


def _check_optional_listen(value: str) -> str:
    return _check_listen(value) if value else value


def orchestrator_addresses(value: Any) -> list[str]:
    """The orchestrator addresses of a setting or option: a list, or one string, of
    comma-separated addresses; each HOST:PORT (a DNS name with several records included)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"expected a list of HOST:PORT or one string of them separated by commas, got {value!r}")
    addresses = [part.strip() for item in items for part in item.split(",")]
    if any(not a for a in addresses) and any(addresses):
        raise ValueError(f"empty address in {value!r}")
    addresses = [a for a in addresses if a]
    for position, address in enumerate(addresses, 1):
        try:
            _check_listen(address)
        except ValueError as exc:
            raise ValueError(f"address {position}: {exc}") from None
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"an address is given twice in {addresses}")
    return addresses


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class _Observability(BaseModel):
    """Settings both servers share (docs/observability.md): logs and the metrics endpoint."""

    # Every line one JSON object (also Alembic's, grpc's and other libraries' lines).
    json_logs: bool = False
    log_level: LogLevel = "INFO"
    # HOST:PORT serving Prometheus metrics at /metrics; empty: no metrics endpoint.
    metrics_listen: str = ""

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    _check_metrics = field_validator("metrics_listen")(classmethod(lambda cls, v: _check_optional_listen(v)))


#: Key of the founding document for the internal issued state (C14); equal to
#: orchestrator.domain.issued_state.INTERNAL_ISSUED_STATE_KEY (shared imports no orchestrator code).
INTERNAL_ISSUED_STATE_KEY = "stateGraphDefinitionManager.certificateInternalIssuedState"

#: RFC 5280 CRLReason names a revocation may use (removeFromCRL lifts a hold, it revokes nothing).
REVOCATION_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                      "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise")


def _default_config_dir() -> pathlib.Path:
    """The repository's examples/ when running from a checkout, else ./config."""
    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    return examples if examples.is_dir() else pathlib.Path("config")


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
            data = loaded.get(section, {}) or {}
            if not isinstance(data, dict):
                raise ConfigurationError(f"{path}: section {section!r} must be a mapping")
            self._data = dict(data)
            aliases = getattr(settings_cls, "ALIASES", {})
            for alias, name in aliases.items():
                given = {where: value for where, value in (
                    (f"{section}.{name}", self._data.get(name)),
                    (f"{section}.{alias}", self._data.pop(alias, None)),
                    (alias, loaded.get(alias))) if value is not None}
                if len({str(v) for v in given.values()}) > 1:
                    raise ConfigurationError(f"{path}: {' and '.join(given)} set {name} to different values "
                                             f"({', '.join(repr(v) for v in given.values())}); give one")
                if given:
                    self._data[name] = next(iter(given.values()))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return self._data.get(field_name), field_name, False  # unused by __call__

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class _AliasEnvSource(PydanticBaseSettingsSource):
    """Environment variables named exactly like the keys in the settings class's ALIASES."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False  # unused by __call__

    def __call__(self) -> dict[str, Any]:
        prefix = self.settings_cls.model_config.get("env_prefix", "")
        found: dict[str, Any] = {}
        for alias, name in getattr(self.settings_cls, "ALIASES", {}).items():
            if alias not in os.environ:
                continue
            value = os.environ[alias]
            prefixed = next((v for k, v in os.environ.items() if k.upper() == (prefix + name).upper()), None)
            if prefixed is not None and prefixed != value:
                raise ConfigurationError(f"environment variables {alias} and {(prefix + name).upper()} disagree "
                                         f"({value!r} vs {prefixed!r}); set one")
            found[name] = value
        return found


_CONFIG_FILE: contextvars.ContextVar[pathlib.Path | None] = contextvars.ContextVar("config_file", default=None)


class _Settings(BaseSettings, _Observability):
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get() or (pathlib.Path(os.environ["CARDLINE_CONFIG"])
                                      if os.environ.get("CARDLINE_CONFIG") else None)
        section = cls.model_config.get("title")
        assert section is not None, "each settings class names its YAML section in model_config's title"
        yaml_source = _YamlSource(settings_cls, path, section)
        return (init_settings, env_settings, _AliasEnvSource(settings_cls), yaml_source)


def _check_name(value: str, what: str) -> str:
    if not value or value != value.strip() or any(c in value for c in "\r\n"):
        raise ValueError(f"{what} must be a non-empty name without surrounding blanks, got {value!r}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: object, what: str) -> float:
    """A duration as the docs write it: seconds as a number, or text `90s`, `15m`, `1h`, `2d`."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration such as 60s, 15m, 1h or 2d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) and len(value) < 40 else None
        if match is None:
            raise ValueError(f"{what}: expected a duration such as 60s, 15m, 1h or 2d, got {quoted(value)}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    try:
        check_duration(seconds, what)       # datetime arithmetic with it must not overflow later
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    return seconds


class IssuedSweeperSettings(BaseModel):
    """C5, opt-in: every `interval`, certificates that have been in the internal issued state
    for longer than `grace_period` (and whose task is finished) are revoked at their CA with
    revoke_reason (None: not revoked) and moved to target_state (with transition_reason when
    that move needs one). Off unless the `issued_sweeper` section is given (docs/
    certificate-handling.md, "The sweeper"); `enabled: false` keeps a written section off.
    Durations: seconds, or `90s`, `15m`, `1h`, `2d`; `grace_period_s` and `interval_s` are
    accepted as older spellings."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    enabled: bool = False
    grace_period: float = Field(default=86400.0, gt=0, validation_alias=AliasChoices("grace_period", "grace_period_s"))
    revoke_reason: str | None = "cessationOfOperation"
    target_state: str = "Revoked"
    transition_reason: str | None = None
    interval: float = Field(default=3600.0, gt=0, validation_alias=AliasChoices("interval", "interval_s"))

    @model_validator(mode="before")
    @classmethod
    def _section_given_means_on(cls, data: Any) -> Any:
        # The documented section has no `enabled`: writing it down is asking for the sweeper.
        if isinstance(data, dict) and data and "enabled" not in data:
            return {**data, "enabled": True}
        return data

    @field_validator("grace_period", "interval", mode="before")
    @classmethod
    def _duration(cls, v: object, info: ValidationInfo) -> float:
        return duration_seconds(v, str(info.field_name))

    @field_validator("revoke_reason")
    @classmethod
    def _check_reason(cls, v: str | None) -> str | None:
        if v is not None and v not in REVOCATION_REASONS:
            raise ValueError(f"unknown revocation reason {v!r}; RFC 5280 names: {', '.join(REVOCATION_REASONS)}")
        return v

    _check_target = field_validator("target_state")(classmethod(lambda cls, v: _check_name(v, "target_state")))


class KeyArchiveSettings(BaseModel):
    """Where the key-encryption key (KEK) of archived private keys (ArchiveKey=true) lives:
    "file" (file_path, default <data_dir>/kek.key, created on first use) or "pkcs11" (an AES
    key key_label on the token token_label of module pkcs11_module; the PIN is read from
    pin_file, never from the environment)."""
    model_config = ConfigDict(extra="forbid")

    kind: Literal["file", "pkcs11"] = "file"
    file_path: pathlib.Path | None = None
    pkcs11_module: str | None = None
    token_label: str | None = None
    pin_file: pathlib.Path | None = None
    key_label: str = "cardline-kek"

    @model_validator(mode="after")
    def _check_pkcs11(self) -> KeyArchiveSettings:
        if self.kind == "pkcs11":
            missing = [n for n in ("pkcs11_module", "token_label", "pin_file") if not getattr(self, n)]
            if missing:
                raise ValueError(f"kind pkcs11 needs {', '.join(missing)}")
        return self


class ReaderSelectorSettings(BaseModel):
    """Readers a `service` identity may lease: the keys of a process task's `reader:`
    (docs/processes.md, "Reader selector"); every key given must match."""
    model_config = ConfigDict(extra="forbid")

    gateway: str | None = None
    reader: str | None = None
    site: str | None = None
    labels: dict[str, str] = {}
    kind: Literal["pcsc", "pkcs11"] | None = None


class PoolSettings(BaseModel):
    """The reader pool (orchestrator/services/pool.py, leases.py): how long a request may wait
    in the queue for a reader, how long the readers of a gateway that went away stay listed
    as OFFLINE, the default and largest ttl of a lease other services take, how many leases
    one caller may hold, and which readers each `service` identity may lease."""
    model_config = ConfigDict(extra="forbid")

    queue_timeout_s: float = Field(default=3600.0, gt=0)
    offline_retention_s: float = Field(default=600.0, ge=0)
    lease_default_ttl_s: float = Field(default=30.0, gt=0)
    lease_max_ttl_s: float = Field(default=3600.0, gt=0)
    # Leases one identity (certificate role and name) may hold or wait for at once.
    max_leases_per_caller: int = Field(default=16, ge=1)
    # Service name (its certificate's CN) -> the selector, or list of selectors, of the readers
    # it may lease; a service named nowhere may lease none (docs/pool.md).
    service_readers: dict[str, list[ReaderSelectorSettings]] = {}

    @field_validator("service_readers", mode="before")
    @classmethod
    def _one_or_more_selectors(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: [s] if isinstance(s, dict) else s for name, s in value.items()}
        return value


class ReplicaSettings(BaseModel):
    """Replicas on one PostgreSQL database sharing one reader pool (docs/replicas.md): the
    address the others reach this one at (empty: its listen address), how often it beats and
    looks at the pool without being told, and after how long without a beat a replica counts
    as gone - the one rule by which its gateways go offline, its queued requests and holds are
    removed, its running card tasks are taken over and its orders adopted."""
    model_config = ConfigDict(extra="forbid")

    advertise_address: str = ""
    heartbeat_interval_s: float = Field(default=5.0, gt=0, le=3600)
    poll_interval_s: float = Field(default=2.0, gt=0, le=600)
    stale_after_s: float = Field(default=30.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _beats_before_stale(self) -> ReplicaSettings:
        # A beat is written every heartbeat_interval_s and seen by the others in their pool view,
        # read at least every poll_interval_s: two of the longer must fit in stale_after_s, or a
        # live replica is taken for dead.
        beat = max(self.heartbeat_interval_s, self.poll_interval_s)
        if self.stale_after_s < 2 * beat:
            raise ValueError(f"stale_after_s ({self.stale_after_s:g}) must be at least twice "
                             f"max(heartbeat_interval_s, poll_interval_s) ({beat:g}): a live replica would be "
                             "taken for dead")
        return self


class OrderSettings(BaseModel):
    """Orders (docs/pool.md, "Orders"): how long an ended order stays in the store."""
    model_config = ConfigDict(extra="forbid")

    # 0: kept for good. What the cards produced (certificates, tasks, the audit trail) stays either way.
    retention_days: float = Field(default=90.0, ge=0, le=36500)

    @property
    def retention(self) -> dt.timedelta | None:
        return dt.timedelta(days=self.retention_days) if self.retention_days else None


class OrchestratorSettings(_Settings):
    model_config = SettingsConfigDict(env_prefix="CARDLINE_ORCHESTRATOR_", env_nested_delimiter="__",
                                      title="orchestrator", extra="forbid")
    #: Exact keys of the founding document -> setting (environment and YAML, see the module doc).
    ALIASES: ClassVar[dict[str, str]] = {INTERNAL_ISSUED_STATE_KEY: "certificate_internal_issued_state"}

    listen: str = "127.0.0.1:7400"
    data_dir: pathlib.Path = pathlib.Path("var/orchestrator")
    database_url: str = ""          # empty: sqlite:///<data_dir>/cardline.db
    # Upgrade the database schema at start-up; false: refuse to start on a database that is
    # not at this release's revision (`cardline db upgrade` upgrades it).
    migrate: bool = False
    step_timeout_s: float = Field(default=120.0, gt=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    # Mutual TLS (shared/tls.py): tls_dir holds ca.crt, orchestrator.crt, orchestrator.key and optionally crl.pem;
    # tls_ca/tls_cert/tls_key/tls_crl name files one by one. insecure: plaintext, development only.
    tls_dir: pathlib.Path | None = None
    tls_ca: pathlib.Path | None = None
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_crl: pathlib.Path | None = None
    insecure: bool = False
    # State graphs, templates, encodings, processes (docs/templates.md "Configuration directory").
    config_dir: pathlib.Path = Field(default_factory=_default_config_dir)
    # Where the secret files the configuration names by a relative path (a card template's
    # transport_puk_key_file) are read from, and must stay in; None: <config_dir>/secrets.
    secrets_dir: pathlib.Path | None = None
    # C14: the state a certificate is in between "received from the CA" and "task finished".
    certificate_internal_issued_state: str = "Issued"
    # C12: type of the card -> certificate relation when the encoding gives no ObjectRelationType.
    default_relation_type: str = "HAS_CERTIFICATE"
    issued_sweeper: IssuedSweeperSettings = Field(default_factory=IssuedSweeperSettings)
    key_archive: KeyArchiveSettings = Field(default_factory=KeyArchiveSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    orders: OrderSettings = Field(default_factory=OrderSettings)
    # C16: seconds between two rounds of the reconciler (it also runs once at start-up).
    reconcile_interval_s: float = Field(default=60.0, gt=0)
    # gRPC health: the database and every CA are checked this often (and at most this long each);
    # a failed check turns the services NOT_SERVING until one succeeds (docs/observability.md).
    health_check_interval_s: float = Field(default=10.0, ge=0.1, le=3600)
    health_check_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # CAs besides the embedded local one, e.g. [{name: corp, kind: openssl, directory: /srv/ca}]
    # (docs/ca-connectors.md); certificate templates name them.
    cas: list[dict[str, Any]] = []

    _check = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))
    _check_issued = field_validator("certificate_internal_issued_state")(
        classmethod(lambda cls, v: _check_name(v, INTERNAL_ISSUED_STATE_KEY)))
    _check_relation = field_validator("default_relation_type")(
        classmethod(lambda cls, v: _check_name(v, "default_relation_type")))

    def effective_secrets_dir(self) -> pathlib.Path:
        return self.secrets_dir if self.secrets_dir is not None else self.config_dir / "secrets"

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
    # HOST:PORT (or dns:///NAME:PORT) of each orchestrator to dial out to, in order of preference;
    # a string is a comma-separated list (so one address keeps working); empty: no link.
    orchestrator: Annotated[list[str], NoDecode] = []
    pkcs11_modules: list[pathlib.Path] = []
    pcsc: bool = True               # watch PC/SC readers (needs pcscd)
    # Mutual TLS (shared/tls.py): tls_dir holds ca.crt, <gateway_id>.crt, <gateway_id>.key and optionally crl.pem;
    # tls_ca/tls_cert/tls_key/tls_crl name files one by one. insecure: plaintext, development only.
    tls_dir: pathlib.Path | None = None
    tls_ca: pathlib.Path | None = None
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_crl: pathlib.Path | None = None
    insecure: bool = False
    reconnect_min_s: float = Field(default=0.2, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)

    _check = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("orchestrator", mode="before")
    @classmethod
    def _check_orchestrator(cls, v: Any) -> list[str]:
        return orchestrator_addresses(v)


SettingsT = TypeVar("SettingsT", bound=_Settings)


def load(settings_cls: type[SettingsT], config_file: pathlib.Path | None = None, **overrides: Any) -> SettingsT:
    """Builds settings (flags > environment > YAML file > defaults), turning every validation
    error into one ConfigurationError that lists them all."""
    token = _CONFIG_FILE.set(config_file)
    try:
        return settings_cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()]
        source = config_file or os.environ.get("CARDLINE_CONFIG")
        where = f" in {source}" if source else ""
        raise ConfigurationError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None
    finally:
        _CONFIG_FILE.reset(token)
