"""Declarative rules from config/routes.toml, compiled once into a RuleSet.

A route's `rules` is a list of tables, each with a `name` (unique per route: the rule id in
errors) and a `kind`: required, type, range, enum, pattern or compare. Fields are dotted paths
into nested objects ("location.lat"). A rule on a field the record does not hold is skipped:
only `required` reports absence. Any mistake in the tables is a ConfigError at load time.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

MAX_PATTERN_CHARS = 200
MISSING: Any = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
# Per kind: the keys a rule table must hold, and the optional ones (besides name and kind).
_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "required": (frozenset({"fields"}), frozenset()),
    "type": (frozenset({"field", "type"}), frozenset()),
    "range": (frozenset({"field"}), frozenset({"min", "max"})),
    "enum": (frozenset({"field", "values"}), frozenset()),
    "pattern": (frozenset({"field", "regex"}), frozenset()),
    "compare": (frozenset({"left", "op", "right"}), frozenset()),
}


class Violation(NamedTuple):
    """One broken rule: where (RFC 6901 pointer), which rule (its name), and why."""

    pointer: str
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A dotted path into nested objects ("location.lat"), split once, with its JSON pointer."""

    parts: tuple[str, ...]
    pointer: str

    @classmethod
    def parse(cls, dotted: Any, where: str) -> FieldPath:
        """The path of a config value; anything but "a.b.c" is a ConfigError naming `where`."""
        if not isinstance(dotted, str) or not all(dotted.split(".")):
            raise ConfigError(f"{where}: field {dotted!r} must be a dotted path like 'a.b'")
        parts = tuple(dotted.split("."))
        escaped = (p.replace("~", "~0").replace("/", "~1") for p in parts)
        return cls(parts, "/" + "/".join(escaped))

    @property
    def dotted(self) -> str:
        """The path as written in config: "location.lat"."""
        return ".".join(self.parts)

    def get(self, record: Any) -> Any:
        """The value at this path, or MISSING when the record does not hold it."""
        value = record
        for part in self.parts:
            if not isinstance(value, dict) or part not in value:
                return MISSING
            value = value[part]
        return value


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    kind: str
    field: FieldPath
    test: Callable[[Any], str | None]  # the value -> None if it passes, else the message


@dataclass(frozen=True, slots=True)
class _Required:
    name: str
    fields: tuple[FieldPath, ...]


@dataclass(frozen=True, slots=True)
class _Compare:
    name: str
    left: FieldPath
    op: str
    right: FieldPath


class RuleSet:
    """A route's compiled rules; check(record) lists every violation, in rule order."""

    def __init__(self, rules: list[_Rule | _Required | _Compare]) -> None:
        self._rules = tuple(rules)

    def __len__(self) -> int:
        return len(self._rules)

    def check(self, record: Any) -> list[Violation]:
        """Every rule the record breaks (an empty list when it passes them all)."""
        return list(self._violations(record))

    def _violations(self, record: Any) -> Iterator[Violation]:
        for rule in self._rules:
            if isinstance(rule, _Required):
                for wanted in rule.fields:
                    if wanted.get(record) is MISSING:
                        yield Violation(wanted.pointer, rule.name, "required field is missing")
            elif isinstance(rule, _Compare):
                message = _compare(rule, record)
                if message is not None:
                    yield Violation(rule.left.pointer, rule.name, message)
            else:
                value = rule.field.get(record)
                if value is MISSING:
                    continue
                message = rule.test(value)
                if message is not None:
                    yield Violation(rule.field.pointer, rule.name, message)


def compile_rules(route: str, tables: Any) -> RuleSet:
    """Compile a route's `rules` list; a mistake raises ConfigError naming route and rule."""
    if not isinstance(tables, list):
        raise ConfigError(f"routes: route {route!r}: rules must be a list of tables")
    compiled: list[_Rule | _Required | _Compare] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        where = f"routes: route {route!r} rule[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: needs a non-empty string 'name'")
        where = f"routes: route {route!r} rule {name!r}"
        if name in seen:
            raise ConfigError(f"{where}: duplicate rule name")
        seen.add(name)
        compiled.append(_compile_one(table, where))
    return RuleSet(compiled)


def _compile_one(table: dict[str, Any], where: str) -> _Rule | _Required | _Compare:
    kind = table.get("kind")
    if kind not in _KEYS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; use one of {sorted(_KEYS)}")
    needed, optional = _KEYS[kind]
    missing = sorted(needed - set(table))
    if missing:
        raise ConfigError(f"{where}: kind {kind!r} needs key {missing[0]!r}")
    unknown = sorted(set(table) - needed - optional - {"name", "kind"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for kind {kind!r}")
    name = str(table["name"])
    if kind == "required":
        fields = table["fields"]
        if not isinstance(fields, list) or not fields:
            raise ConfigError(f"{where}: 'fields' must be a non-empty list of field paths")
        return _Required(name, tuple(FieldPath.parse(f, where) for f in fields))
    if kind == "compare":
        if table["op"] not in _OPS:
            raise ConfigError(f"{where}: op {table['op']!r} must be one of {list(_OPS)}")
        left = FieldPath.parse(table["left"], where)
        right = FieldPath.parse(table["right"], where)
        return _Compare(name, left, table["op"], right)
    field = FieldPath.parse(table["field"], where)
    builders = {"type": _type_test, "range": _range_test, "enum": _enum_test}
    test = builders.get(kind, _pattern_test)(table, where)
    return _Rule(name, kind, field, test)


def _type_test(table: dict[str, Any], where: str) -> Callable[[Any], str | None]:
    wanted = table["type"]
    if wanted not in _TYPES:
        raise ConfigError(f"{where}: type {wanted!r} must be one of {sorted(_TYPES)}")
    check = _TYPES[wanted]
    message = f"expected {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}"
    return lambda value: None if check(value) else message


def _range_test(table: dict[str, Any], where: str) -> Callable[[Any], str | None]:
    low, high = table.get("min"), table.get("max")
    if low is None and high is None:
        raise ConfigError(f"{where}: kind 'range' needs 'min', 'max' or both")
    for key, bound in (("min", low), ("max", high)):
        if bound is not None and (not _is_number(bound) or not math.isfinite(bound)):
            raise ConfigError(f"{where}: {key} must be a finite number")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"{where}: min {low} is above max {high}")

    def test(value: Any) -> str | None:
        if not _is_number(value):
            return "expected a number"
        if low is not None and value < low:
            return f"must be >= {low}"
        if high is not None and value > high:
            return f"must be <= {high}"
        return None

    return test


def _kinded(value: Any) -> tuple[str, Any]:
    """A value keyed by its JSON kind, so that true never equals 1 and "1" never equals 1."""
    if isinstance(value, bool):
        return ("boolean", value)
    if _is_number(value):
        return ("number", value)
    return (type(value).__name__, value)


def _enum_test(table: dict[str, Any], where: str) -> Callable[[Any], str | None]:
    values = table["values"]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: 'values' must be a non-empty list")
    allowed = [_kinded(v) for v in values]
    message = f"must be one of {values}"[:200]
    return lambda value: None if _kinded(value) in allowed else message


def _pattern_test(table: dict[str, Any], where: str) -> Callable[[Any], str | None]:
    regex = table["regex"]
    if not isinstance(regex, str):
        raise ConfigError(f"{where}: regex must be a string")
    if len(regex) > MAX_PATTERN_CHARS:
        raise ConfigError(f"{where}: regex is over {MAX_PATTERN_CHARS} characters")
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise ConfigError(f"{where}: bad regex: {exc}") from None
    message = f"does not match {regex}"

    def test(value: Any) -> str | None:
        if not isinstance(value, str):
            return "expected a string"
        return None if compiled.fullmatch(value) else message

    return test


def _as_instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)  # dates too: "2026-01-31" is that day's midnight
    except ValueError:
        return None


def _compare(rule: _Compare, record: Any) -> str | None:
    left, right = rule.left.get(record), rule.right.get(record)
    if left is MISSING or right is MISSING:
        return None
    text = f"must be {rule.op} {'.'.join(rule.right.parts)}"
    if _is_number(left) and _is_number(right):
        return None if _OPS[rule.op](left, right) else text
    a, b = _as_instant(left), _as_instant(right)
    if a is not None and b is not None:
        if (a.tzinfo is None) != (b.tzinfo is None):
            return f"cannot compare with {'.'.join(rule.right.parts)}: one has a time zone"
        return None if _OPS[rule.op](a, b) else text
    if rule.op in {"==", "!="} and _kinded(left)[0] == _kinded(right)[0]:
        return None if _OPS[rule.op](left, right) else text
    return f"cannot compare with {'.'.join(rule.right.parts)}: not two numbers or dates"
