"""Loads ``config/upstream.toml`` into frozen, typed settings with named defaults.

It must never guess: an unknown section or key, or a value of the wrong type, stops the
start with a message naming the key.
"""

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from empsecrets.providers import ProviderSettings, SecretReferenceError, parse_reference
from upstream.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/upstream.toml")
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = 8081


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """Where the DuckDB file lives."""

    path: Path = field(default_factory=lambda: Path("var/emp.duckdb").absolute())


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """Where the secret shared with the gateway is kept."""

    secret_file: Path = field(
        default_factory=lambda: Path("var/secrets/upstream.secret").absolute()
    )


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long ingest rows stay before `POST /internal/archive` moves them to Parquet.

    Windows are whole days, at least 1 (docs/security/retention.md). Quarantined records are
    counted from their review; a pending record is never archived.
    """

    archive_dir: Path = field(default_factory=lambda: Path("var/archive").absolute())
    ingest_records_days: int = 180
    ingest_quarantine_days: int = 30


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """Where the data key ring that seals sensitive columns comes from (upstream/sealing.py).

    `data_keys` is a secret reference (`keystore:NAME`, `file:PATH` or `env:NAME`), never
    the keys. The keystore and its master key default to ``secrets/keystore.json`` and
    ``secrets/keystore.master`` in the database file's directory (var/ in a checkout).
    """

    data_keys: str = "keystore:emp-data-keys"
    keystore_file: Path | None = None
    master_key_file: Path | None = None

    def provider_settings(self, database_path: Path) -> ProviderSettings:
        """Where `keystore:` references are read, for a database at `database_path`."""
        secrets_dir = database_path.parent / "secrets"
        return ProviderSettings(
            keystore_file=self.keystore_file or secrets_dir / "keystore.json",
            master_key_file=self.master_key_file or secrets_dir / "keystore.master",
        )


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Every setting of the service, checked once at start."""

    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)

    @property
    def provider_settings(self) -> ProviderSettings:
        """Where this service's `keystore:` references are read."""
        return self.encryption.provider_settings(self.database.path)


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string")
    return value


def _port(key: str, value: object) -> int:
    # bool is an int in Python; `port = true` is a typo, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_PORT:
        raise ConfigError(f"{key} must be an integer between 1 and {_MAX_PORT}")
    return value


def _path(key: str, value: object) -> Path:
    # Relative paths resolve against the current working directory, once, here.
    return Path(_text(key, value)).absolute()


def _reference(key: str, value: object) -> str:
    text = _text(key, value)
    try:
        parse_reference(text)
    except SecretReferenceError as error:
        raise ConfigError(f"{key}: {error}") from None
    return text


MAX_RETENTION_DAYS = 36_500  # a century: beyond it a typo, not a policy


def _days(key: str, value: object) -> int:
    # 0 would archive (and delete) every row at once: never what a typo should do.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number of days")
    if not 1 <= value <= MAX_RETENTION_DAYS:
        raise ConfigError(f"{key} must be from 1 to {MAX_RETENTION_DAYS} days")
    return value


_Parser = Callable[[str, object], Any]
_SCHEMA: Mapping[str, tuple[type[Any], Mapping[str, _Parser]]] = {
    "server": (ServerConfig, {"host": _text, "port": _port}),
    "database": (DatabaseConfig, {"path": _path}),
    "trust": (TrustConfig, {"secret_file": _path}),
    "retention": (
        RetentionConfig,
        {"archive_dir": _path, "ingest_records_days": _days, "ingest_quarantine_days": _days},
    ),
    "encryption": (
        EncryptionConfig,
        {"data_keys": _reference, "keystore_file": _path, "master_key_file": _path},
    ),
}


def parse_config(document: Mapping[str, object], source: str) -> UpstreamConfig:
    """Turn a parsed TOML document into settings, naming any unknown or bad key."""
    sections: dict[str, object] = {}
    for section_name, section in document.items():
        if section_name not in _SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section_name}]")
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: [{section_name}] must be a table")
        section_type, parsers = _SCHEMA[section_name]
        values: dict[str, object] = {}
        for key, value in section.items():
            dotted = f"{section_name}.{key}"
            if key not in parsers:
                raise ConfigError(f"{source}: unknown key {dotted}")
            values[key] = parsers[key](f"{source}: {dotted}", value)
        sections[section_name] = section_type(**values)
    return UpstreamConfig(**sections)  # type: ignore[arg-type]


def load_config(path: Path | None) -> UpstreamConfig:
    """Read the config file; without an explicit path, a missing default file means defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.is_file():
            return UpstreamConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as config_file:
            document = tomllib.load(config_file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    return parse_config(document, str(path))


def with_overrides(
    config: UpstreamConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    database_path: Path | None = None,
    secret_file: Path | None = None,
) -> UpstreamConfig:
    """Apply command-line flags, which win over the file."""
    server = config.server
    if host is not None:
        server = replace(server, host=_text("--host", host))
    if port is not None:
        server = replace(server, port=_port("--port", port))
    database = config.database
    if database_path is not None:
        database = replace(database, path=database_path.absolute())
    trust = config.trust
    if secret_file is not None:
        trust = replace(trust, secret_file=secret_file.absolute())
    return replace(config, server=server, database=database, trust=trust)
