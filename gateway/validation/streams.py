"""Per-stream validation config from config/streams.toml, checked once at start.

A stream may replace its route's record schema, add rules, name its sensitive fields, choose
partial or all-or-nothing batches, and turn on statistical checks and an outlier model. Streams
the file does not list get the ingest route's own schema and rules (or are refused, by config).
Any mistake is a ConfigError naming the stream and the key: a bad config never starts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import jsonschema

from gateway.config import ConfigError, read_toml
from gateway.validation.anomaly import ALGORITHMS
from gateway.validation.rules import FieldPath, RuleSet, compile_rules
from gateway.validation.schemas import SchemaCheck

if TYPE_CHECKING:
    from pathlib import Path

Mode = Literal["partial", "all_or_nothing"]
Action = Literal["accept", "quarantine", "reject"]
STREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
METHODS = ("iqr", "zscore", "mad")
# Defaults chosen with bench/eval_anomaly.py: each keeps false positives on normal data far
# under 1% per field while 5-sigma spikes stay well outside.
DEFAULT_THRESHOLDS = {"iqr": 3.0, "zscore": 4.0, "mad": 3.5}
_MODES = ("partial", "all_or_nothing")
_FLAG_ACTIONS = ("quarantine", "reject")
_COLD_START_ACTIONS = ("accept", "quarantine", "reject")
_TOP_KEYS = {"defaults", "stream"}
_DEFAULT_KEYS = {"mode", "unknown_streams", "max_records"}
_STREAM_KEYS = {
    "name", "record_schema", "mode", "sensitive", "rules", "statistics", "model", "description",
}  # fmt: skip
_STATS_KEYS = {
    "checks", "window_hours", "max_records", "refresh_seconds", "min_samples", "action",
    "on_cold_start", "on_error", "max_age_seconds",
}  # fmt: skip
_CHECK_KEYS = {"field", "method", "threshold"}
_MODEL_KEYS = {
    "features", "algorithm", "contamination", "window_hours", "max_records", "min_samples",
    "action", "on_cold_start", "on_error",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class StatCheck:
    """One statistical check: a numeric field, a method (iqr, zscore, mad), its threshold."""

    field: FieldPath
    method: str
    threshold: float

    @property
    def rule(self) -> str:
        """The check's rule id in receipts and metrics: "stats.zscore"."""
        return f"stats.{self.method}"


@dataclass(frozen=True, slots=True)
class StatisticsConfig:
    """Statistical checks against a baseline of the stream's recent accepted records."""

    checks: tuple[StatCheck, ...]
    window_hours: int = 24
    max_records: int = 50_000
    refresh_seconds: float = 300.0
    max_age_seconds: float = 1800.0  # a baseline older than this (refresh failing) is an error
    min_samples: int = 200
    action: Action = "quarantine"
    on_cold_start: Action = "accept"  # too few samples yet: quarantined data would never count
    on_error: Action = "quarantine"  # no fresh baseline: never silently "clean"

    @property
    def fields(self) -> tuple[str, ...]:
        """The distinct fields the checks need, in config order."""
        return tuple(dict.fromkeys(check.field.dotted for check in self.checks))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The stream's outlier model: its features, how it is trained and what a flag does."""

    features: tuple[FieldPath, ...]
    algorithm: str = "hbos"
    contamination: float = 0.01
    window_hours: int = 720
    max_records: int = 100_000
    min_samples: int = 500
    action: Action = "quarantine"
    on_cold_start: Action = "accept"  # no model trained yet
    on_error: Action = "quarantine"  # a model that fails to load or to score

    @property
    def names(self) -> tuple[str, ...]:
        """The feature names, dotted, in training order."""
        return tuple(feature.dotted for feature in self.features)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Everything the validator applies to one stream's records."""

    name: str
    mode: Mode
    record_schema: SchemaCheck | None = None
    rules: RuleSet | None = None
    sensitive: tuple[str, ...] = ()  # JSON pointers; a value at or below one is masked
    statistics: StatisticsConfig | None = None
    model: ModelConfig | None = None
    listed: bool = True  # False: a stream the file does not name, checked with the defaults

    def is_sensitive(self, pointer: str) -> bool:
        """Whether the value at this record pointer must never be logged or echoed."""
        return any(pointer == p or pointer.startswith(p + "/") for p in self.sensitive)


@dataclass(frozen=True, slots=True)
class StreamCatalog:
    """The configured streams, and what happens to the others."""

    streams: dict[str, StreamSpec]
    mode: Mode = "all_or_nothing"
    unknown_streams: Literal["accept", "reject"] = "accept"
    max_records: int = 10_000

    def spec(self, name: str) -> StreamSpec | None:
        """The stream's spec; an unlisted stream gets the defaults, or None when refused."""
        found = self.streams.get(name)
        if found is not None:
            return found
        if self.unknown_streams == "reject":
            return None
        return StreamSpec(name=name, mode=self.mode, listed=False)

    def with_models(self) -> list[StreamSpec]:
        """Streams with an outlier model configured."""
        return [spec for spec in self.streams.values() if spec.model is not None]

    def with_statistics(self) -> list[StreamSpec]:
        """Streams with statistical checks configured."""
        return [spec for spec in self.streams.values() if spec.statistics is not None]


def load_streams(path: Path, schema_dir: Path) -> StreamCatalog:
    """Read and check the stream file; a mistake raises ConfigError naming where."""
    raw = read_toml(path, "stream file")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; expected [defaults], [[stream]]")
    defaults = _table(raw.get("defaults", {}), "streams: [defaults]")
    _no_unknown(defaults, _DEFAULT_KEYS, "streams: [defaults]")
    mode = _choice(defaults, "mode", _MODES, "all_or_nothing", "streams: [defaults]")
    entries = raw.get("stream", [])
    if not isinstance(entries, list):
        raise ConfigError("streams: 'stream' must be an array of tables ([[stream]])")
    streams: dict[str, StreamSpec] = {}
    for index, entry in enumerate(entries):
        spec = _stream(entry, index, mode, schema_dir)
        if spec.name in streams:
            raise ConfigError(f"streams: stream {spec.name!r} is defined twice")
        streams[spec.name] = spec
    return StreamCatalog(
        streams=streams,
        mode=mode,
        unknown_streams=_choice(
            defaults, "unknown_streams", ("accept", "reject"), "accept", "streams: [defaults]"
        ),
        max_records=_int(defaults, "max_records", 10_000, 1, 10_000, "streams: [defaults]"),
    )


def _stream(entry: Any, index: int, default_mode: Mode, schema_dir: Path) -> StreamSpec:
    where = f"streams: stream[{index}]"
    table = _table(entry, where)
    name = table.get("name")
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        raise ConfigError(f"{where}: 'name' must match {STREAM_NAME.pattern}")
    where = f"streams: stream {name!r}"
    _no_unknown(table, _STREAM_KEYS, where)
    sensitive = table.get("sensitive", [])
    if not isinstance(sensitive, list):
        raise ConfigError(f"{where}: 'sensitive' must be a list of field paths")
    return StreamSpec(
        name=name,
        mode=_choice(table, "mode", _MODES, default_mode, where),
        record_schema=_schema(table.get("record_schema"), schema_dir, where),
        rules=compile_rules(f"stream {name}", table["rules"]) if "rules" in table else None,
        sensitive=tuple(FieldPath.parse(field, where).pointer for field in sensitive),
        statistics=_statistics(table["statistics"], where) if "statistics" in table else None,
        model=_model(table["model"], where) if "model" in table else None,
    )


def _statistics(entry: Any, where: str) -> StatisticsConfig:
    where = f"{where} statistics"
    table = _table(entry, where)
    _no_unknown(table, _STATS_KEYS, where)
    raw_checks = table.get("checks")
    if not isinstance(raw_checks, list) or not raw_checks:
        raise ConfigError(f"{where}: 'checks' must be a non-empty list of tables")
    checks: list[StatCheck] = []
    for index, raw in enumerate(raw_checks):
        at = f"{where} check[{index}]"
        check = _table(raw, at)
        _no_unknown(check, _CHECK_KEYS, at)
        if "field" not in check:
            raise ConfigError(f"{at}: needs 'field'")
        method = _choice(check, "method", METHODS, "mad", at)
        threshold = _number(check, "threshold", DEFAULT_THRESHOLDS[method], 0.5, 100.0, at)
        checks.append(StatCheck(FieldPath.parse(check["field"], at), method, threshold))
    if len({c.field.dotted for c in checks}) > 32:  # noqa: PLR2004 - the upstream's field limit
        raise ConfigError(f"{where}: at most 32 distinct fields")
    return StatisticsConfig(
        checks=tuple(checks),
        window_hours=_int(table, "window_hours", 24, 1, 8760, where),
        max_records=_int(table, "max_records", 50_000, 10, 1_000_000, where),
        refresh_seconds=_number(table, "refresh_seconds", 300.0, 1.0, 86_400.0, where),
        max_age_seconds=_number(table, "max_age_seconds", 1800.0, 1.0, 7 * 86_400.0, where),
        min_samples=_int(table, "min_samples", 200, 10, 1_000_000, where),
        action=_choice(table, "action", _FLAG_ACTIONS, "quarantine", where),
        on_cold_start=_choice(table, "on_cold_start", _COLD_START_ACTIONS, "accept", where),
        on_error=_choice(table, "on_error", _FLAG_ACTIONS, "quarantine", where),
    )


def _model(entry: Any, where: str) -> ModelConfig:
    where = f"{where} model"
    table = _table(entry, where)
    _no_unknown(table, _MODEL_KEYS, where)
    features = table.get("features")
    if not isinstance(features, list) or not features or len(features) > 32:  # noqa: PLR2004
        raise ConfigError(f"{where}: 'features' must list 1 to 32 numeric field paths")
    parsed = tuple(FieldPath.parse(feature, where) for feature in features)
    if len({f.dotted for f in parsed}) != len(parsed):
        raise ConfigError(f"{where}: a feature is listed twice")
    return ModelConfig(
        features=parsed,
        algorithm=_choice(table, "algorithm", ALGORITHMS, "hbos", where),
        contamination=_number(table, "contamination", 0.01, 0.0001, 0.5, where),
        window_hours=_int(table, "window_hours", 720, 1, 87_600, where),
        max_records=_int(table, "max_records", 100_000, 50, 1_000_000, where),
        min_samples=_int(table, "min_samples", 500, 50, 1_000_000, where),
        action=_choice(table, "action", _FLAG_ACTIONS, "quarantine", where),
        on_cold_start=_choice(table, "on_cold_start", _COLD_START_ACTIONS, "accept", where),
        on_error=_choice(table, "on_error", _FLAG_ACTIONS, "quarantine", where),
    )


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a table")
    return value


def _no_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {sorted(known)}")


def _choice(
    table: dict[str, Any], key: str, allowed: tuple[str, ...], default: str, where: str
) -> Any:
    value = table.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{where}: {key} {value!r} must be one of {list(allowed)}")
    return value


def _int(  # noqa: PLR0917 - (table, key, default, bounds, where) read best in this order
    table: dict[str, Any], key: str, default: int, low: int, high: int, where: str
) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: {key} must be an integer from {low} to {high}")
    return value


def _number(  # noqa: PLR0917 - as _int
    table: dict[str, Any], key: str, default: float, low: float, high: float, where: str
) -> float:
    value = table.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{where}: {key} must be a number from {low} to {high}")
    return float(value)


def _schema(name: Any, schema_dir: Path, where: str) -> SchemaCheck | None:
    if name is None:
        return None
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise ConfigError(f"{where}: record_schema must be a file name in {schema_dir}")
    path = schema_dir / name
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        check = SchemaCheck(loaded)
    except FileNotFoundError:
        raise ConfigError(f"{where}: record_schema {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {path} is not valid JSON: {exc}") from None
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"{where}: {path} is not a valid JSON Schema: {exc.message}") from None
    except (ValueError, TypeError) as exc:  # jsonschema-rs refusing what passed check_schema
        raise ConfigError(f"{where}: {path}: {exc}") from None
    return check
