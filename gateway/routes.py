"""The route table: every upstream route by name, loaded from config/routes.toml.

Matching happens once, on the normalised path. The policy decides on the route's resource and
action; the validator picks the route's schemas. A path no route names never reaches the policy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonschema
from jsonschema import Draft202012Validator

from gateway.config import ConfigError, read_toml
from gateway.validation.rules import RuleSet, compile_rules

if TYPE_CHECKING:
    from pathlib import Path

_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)(?::((?:[^{}]|\{[^{}]*\})+))?\}")
_DEFAULT_PARAM_PATTERN = "[^/]+"
_KNOWN_KEYS = {
    "name", "methods", "path", "resource", "action", "schema", "record_schema",
    "content_types", "max_body_bytes", "public", "rules", "served_by", "sensitive", "sealed",
}  # fmt: skip
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


@dataclass(frozen=True)
class Route:
    """One named route: what it is (resource, action) and how its requests are checked."""

    name: str
    methods: frozenset[str]
    path: str
    resource: str
    action: str
    pattern: re.Pattern[str]
    schema: dict[str, Any] | None = None
    record_schema: dict[str, Any] | None = None
    content_types: tuple[str, ...] = ("application/json",)
    max_body_bytes: int | None = None
    public: bool = False
    # Declarative rules (gateway/validation/rules.py), run after the schema on the body or,
    # with record_schema, on each record.
    rules: RuleSet | None = None
    # "upstream" (forwarded) or "gateway" (answered by a handler in gateway/stages/local.py).
    served_by: str = "upstream"
    # Body fields whose values the audit event never shows ("***"), e.g. an employee's email.
    sensitive: frozenset[str] = frozenset()
    # Body fields the EMP service seals at rest (docs/security/encryption.md): the audit trail's
    # JSON lines show "***", and only the audit store keeps the value, sealed, for the console.
    sealed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RouteMatch:
    """A route and the path parameters it captured."""

    route: Route
    params: dict[str, str] = field(default_factory=dict)


class RouteTable:
    """Match a normalised path and method against the configured routes."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(routes)
        names = [r.name for r in routes]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ConfigError(f"routes: duplicate route name(s) {sorted(duplicated)}")

    def match(self, method: str, path: str) -> tuple[RouteMatch | None, frozenset[str]]:
        """The route for (method, path), or None plus the methods the path does allow."""
        allowed: set[str] = set()
        for route in self.routes:
            found = route.pattern.fullmatch(path)
            if found is None or any("/" in value for value in found.groupdict().values()):
                # A parameter never spans segments, whatever pattern the table gives it.
                continue
            if method in route.methods:
                return RouteMatch(route, found.groupdict()), frozenset()
            allowed |= route.methods
        return None, frozenset(allowed)


def compile_path(path: str) -> re.Pattern[str]:
    """Turn `/api/tickets/{id:[0-9]+}` into an anchored regex with named groups."""
    if not path.startswith("/"):
        raise ConfigError(f"routes: path {path!r} must start with '/'")
    out: list[str] = []
    last = 0
    for param in _PARAM.finditer(path):
        out.append(re.escape(path[last : param.start()]))
        out.append(f"(?P<{param.group(1)}>{param.group(2) or _DEFAULT_PARAM_PATTERN})")
        last = param.end()
    out.append(re.escape(path[last:]))
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ConfigError(f"routes: path {path!r} has a bad parameter pattern: {exc}") from None


def load_routes(file: Path, schema_dir: Path) -> RouteTable:
    """Read the route table and the schemas it names; any mistake stops the start."""
    raw = read_toml(file, "route table")
    entries = raw.get("route", [])
    if set(raw) - {"route"} or not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: expected one or more [[route]] tables and nothing else")
    return RouteTable([_route(entry, i, schema_dir) for i, entry in enumerate(entries)])


def _route(entry: dict[str, Any], index: int, schema_dir: Path) -> Route:
    where = f"route[{index}]"
    unknown = sorted(set(entry) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"routes: unknown key {where}.{unknown[0]}")
    for key in ("name", "methods", "path", "resource", "action"):
        if key not in entry:
            raise ConfigError(f"routes: missing key {where}.{key}")
    methods = frozenset(str(m).upper() for m in entry["methods"])
    if not methods or methods - _METHODS:
        raise ConfigError(f"routes: {where}.methods must be a subset of {sorted(_METHODS)}")
    return Route(
        name=str(entry["name"]),
        methods=methods,
        path=str(entry["path"]),
        resource=str(entry["resource"]),
        action=str(entry["action"]),
        pattern=compile_path(str(entry["path"])),
        schema=_schema(entry.get("schema"), schema_dir, f"{where}.schema"),
        record_schema=_schema(entry.get("record_schema"), schema_dir, f"{where}.record_schema"),
        content_types=tuple(entry.get("content_types", ("application/json",))),
        max_body_bytes=entry.get("max_body_bytes"),
        public=bool(entry.get("public", False)),
        rules=compile_rules(str(entry["name"]), entry["rules"]) if "rules" in entry else None,
        served_by=_served_by(entry.get("served_by", "upstream"), where),
        sensitive=frozenset(_names(entry.get("sensitive", []), f"{where}.sensitive")),
        sealed=frozenset(_names(entry.get("sealed", []), f"{where}.sealed")),
    )


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"routes: {where} must be a list of field names")
    return value


def _served_by(value: Any, where: str) -> str:
    if value not in {"upstream", "gateway"}:
        raise ConfigError(f'routes: {where}.served_by must be "upstream" or "gateway"')
    return str(value)


def _schema(name: str | None, schema_dir: Path, where: str) -> dict[str, Any] | None:
    if name is None:
        return None
    path = schema_dir / name
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"routes: {where} names {path}, which does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"routes: {where}: {path} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"routes: {where}: {path} must hold a JSON object")
    try:
        Draft202012Validator.check_schema(loaded)
    except jsonschema.SchemaError as exc:
        raise ConfigError(
            f"routes: {where}: {path} is not a valid JSON Schema: {exc.message}"
        ) from None
    return loaded
