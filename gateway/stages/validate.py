"""Request validation: content type, strict JSON, the route's JSON Schema (2020-12), its rules.

Validators are compiled once at start. A failure names the JSON pointer of the failing field.
Never passes NaN/Infinity, duplicate keys or an unparsed body to the upstream.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import jsonschema
from jsonschema import Draft202012Validator

from gateway.pipeline import Denial, RequestContext

if TYPE_CHECKING:
    from gateway.routes import Route, RouteTable
    from gateway.validation.rules import RuleSet

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NDJSON = "application/x-ndjson"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # "1e999" is valid JSON syntax but overflows to inf: as non-finite as a bare Infinity.
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # Two parsers may keep different copies of a duplicated key: refuse the ambiguity.
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity (nor numbers overflowing to it), no duplicate keys."""
    return json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        object_pairs_hook=_no_duplicates,
    )


def json_pointer(path: Any) -> str:
    """RFC 6901 pointer for a jsonschema error path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else ""


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


class ValidateStage:
    """Parses the body of write routes into ctx.payload and checks it against the schemas."""

    name = "validate"

    def __init__(self, table: RouteTable, *, max_body_bytes: int) -> None:
        self._max_body = max_body_bytes
        self._schemas: dict[str, Draft202012Validator] = {}
        self._records: dict[str, Draft202012Validator] = {}
        for route in table.routes:
            if route.schema is not None:
                self._schemas[route.name] = _validator(route.schema)
            if route.record_schema is not None:
                self._records[route.name] = _validator(route.record_schema)

    async def __call__(self, ctx: RequestContext) -> None:
        """Validate a write request's body; other requests pass untouched."""
        route = ctx.route
        if route is None or ctx.request.method not in _BODY_METHODS:
            return
        content_type = ctx.request.content_type
        if content_type not in route.content_types:
            raise Denial(
                "validation.content_type",
                f"content type {content_type!r} is not accepted; use one of "
                f"{list(route.content_types)}",
            )
        body = await ctx.read_body(route.max_body_bytes or self._max_body)
        ctx.payload = self._parse(body, content_type)
        self._check(route, ctx.payload)

    def _parse(self, body: bytes, content_type: str) -> Any:
        try:
            # UTF-8 only (RFC 8259 section 8.1), decoded strictly here: json.loads on bytes
            # would also accept UTF-16/32, which the upstream might read differently.
            text = body.decode("utf-8")
            if content_type == NDJSON:
                return self._parse_ndjson(text)
            return parse_json(text)
        except UnicodeDecodeError:
            raise Denial("validation.malformed_json", "body is not UTF-8") from None
        except RecursionError:
            raise Denial("validation.malformed_json", "body is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise Denial("validation.malformed_json", f"body is not valid JSON: {exc}") from None

    @staticmethod
    def _parse_ndjson(text: str) -> list[Any]:
        records = []
        # Split on "\n" only, as the upstream does: str.splitlines() would also split inside
        # strings holding U+2028 and friends, and the two sides would disagree on the records.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_json(line))
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
        return records

    def _check(self, route: Route, payload: Any) -> None:
        schema = self._schemas.get(route.name)
        if schema is not None:
            _raise_first_error(schema, payload, prefix="")
        records = self._records.get(route.name)
        if records is None:
            if route.rules:
                _raise_first_violation(route.rules, payload, prefix="")
            return
        batch = payload if isinstance(payload, list) else [payload]
        if not batch:
            raise Denial("validation.schema", "the batch holds no records", pointer="")
        for index, record in enumerate(batch):
            prefix = f"/{index}" if isinstance(payload, list) else ""
            _raise_first_error(records, record, prefix=prefix)
        if route.rules:
            for index, record in enumerate(batch):
                prefix = f"/{index}" if isinstance(payload, list) else ""
                _raise_first_violation(route.rules, record, prefix=prefix)


def _offending_key(error: jsonschema.ValidationError) -> list[str]:
    """For missing or unexpected properties, the pointer names the property, not its parent."""
    instance = error.instance
    if error.validator == "required" and isinstance(error.validator_value, list):
        present = instance if isinstance(instance, dict) else {}
        return [k for k in error.validator_value if k not in present][:1]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return [k for k in instance if k not in known][:1]
    return []


def _raise_first_error(validator: Draft202012Validator, instance: Any, *, prefix: str) -> None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return
    pointer = prefix + json_pointer([*error.absolute_path, *_offending_key(error)])
    raise Denial(
        "validation.schema",
        f"{pointer or '/'}: {error.message}"[:500],
        pointer=pointer,
    )


def _raise_first_violation(rules: RuleSet, record: Any, *, prefix: str) -> None:
    """The route's rules, after the schema passed: the first violation refuses (422)."""
    violations = rules.check(record)
    if not violations:
        return
    first = violations[0]
    pointer = prefix + first.pointer
    denial = Denial(
        "validation.rule",
        f"{pointer or '/'}: {first.message}"[:500],
        pointer=pointer,
        rule=first.rule,
    )
    # Denial's own `message` parameter is the client-facing text; the detail carries the rule's.
    denial.detail["message"] = first.message[:500]
    raise denial
