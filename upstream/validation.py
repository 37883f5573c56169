"""Checks request bodies and query strings against a resource spec, answering 400s.

The gateway validates with JSON Schema first; this is the service defending itself, so it
must never trust a field it has not checked, nor let a client set a server-owned field.
"""

import re
from collections.abc import Mapping

from multidict import MultiMapping

from upstream.errors import bad_request
from upstream.schema import EMAIL_SHAPE, MAX_ID, Column, Kind, ResourceSpec

Values = dict[str, object]

_DIGITS = re.compile(r"^[0-9]{1,19}$")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


def _check_id(column: Column, value: object) -> object:
    # bool is an int in Python; `true` is not a valid id.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise bad_request(f"field '{column.name}' must be a positive integer id")
    return value


def _check_text(column: Column, value: object) -> object:
    if not isinstance(value, str):
        raise bad_request(f"field '{column.name}' must be a string")
    if column.required and not value.strip():
        raise bad_request(f"field '{column.name}' must not be empty")
    if len(value) > column.max_length:
        raise bad_request(f"field '{column.name}' is longer than {column.max_length} characters")
    if column.kind is Kind.EMAIL and not EMAIL_SHAPE.match(value):
        raise bad_request(f"field '{column.name}' must be an email address")
    if column.kind is Kind.CHOICE and value not in column.choices:
        allowed = ", ".join(column.choices)
        raise bad_request(f"field '{column.name}' must be one of: {allowed}")
    return value


def check_value(column: Column, value: object) -> object:
    """Return ``value`` if it is acceptable for ``column``, else raise a 400 naming it."""
    if value is None:
        if column.required or column.default is not None:
            raise bad_request(f"field '{column.name}' must not be null")
        return None
    if column.kind is Kind.ID:
        return _check_id(column, value)
    return _check_text(column, value)


def _writable_fields(spec: ResourceSpec, body: object) -> Mapping[str, object]:
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object describing a {spec.singular}")
    for name in body:
        column = spec.column(name)
        if column is None:
            raise bad_request(f"unknown field '{name}' for a {spec.singular}")
        if not column.writable:
            raise bad_request(f"field '{name}' is set by the server and must not be sent")
    return body


def full_values(spec: ResourceSpec, body: object) -> Values:
    """Values for POST and PUT: every writable column, defaults filling the gaps."""
    fields = _writable_fields(spec, body)
    values: Values = {}
    for column in spec.writable:
        if column.name not in fields:
            if column.required:
                raise bad_request(f"field '{column.name}' is required")
            values[column.name] = column.default
            continue
        values[column.name] = check_value(column, fields[column.name])
    return values


def partial_values(spec: ResourceSpec, body: object) -> Values:
    """Values for PATCH: only the columns sent, at least one."""
    fields = _writable_fields(spec, body)
    if not fields:
        raise bad_request(f"the body names no {spec.singular} field to change")
    values: Values = {}
    for name, value in fields.items():
        column = spec.column(name)
        if column is not None:
            values[name] = check_value(column, value)
    return values


def parse_row_id(raw: str) -> int | None:
    """The id in a URL, or None when it cannot name any row."""
    if not _DIGITS.match(raw):
        return None
    value = int(raw)
    return value if 1 <= value <= MAX_ID else None


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise bad_request(f"query parameter '{name}' is given more than once")
    return values[0] if values else None


def parse_count(query: MultiMapping[str], name: str, *, default: int, maximum: int) -> int:
    """A non-negative integer query parameter with a ceiling."""
    raw = _single(query, name)
    if raw is None:
        return default
    if not _DIGITS.match(raw) or int(raw) > maximum:
        raise bad_request(f"query parameter '{name}' must be an integer from 0 to {maximum}")
    return int(raw)


def parse_filters(spec: ResourceSpec, query: MultiMapping[str]) -> Values:
    """Exact-match filters; only whitelisted columns, each value checked like a body field."""
    filters: Values = {}
    for name in query:
        if name in {"limit", "offset"} or name in filters:
            continue
        if name not in spec.filters:
            allowed = ", ".join(("limit", "offset", *spec.filters))
            raise bad_request(f"unknown query parameter '{name}'; allowed: {allowed}")
        raw = _single(query, name)
        column = spec.column(name)
        if raw is None or column is None:
            continue
        value: object = raw
        if column.kind is Kind.ID:
            value = parse_row_id(raw)
            if value is None:
                raise bad_request(f"query parameter '{name}' must be a positive integer id")
        filters[name] = check_value(column, value)
    return filters


def parse_limit(query: MultiMapping[str]) -> int:
    """The page size: 1 to MAX_LIMIT, DEFAULT_LIMIT when absent."""
    limit = parse_count(query, "limit", default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
    if limit == 0:
        raise bad_request(f"query parameter 'limit' must be from 1 to {MAX_LIMIT}")
    return limit
