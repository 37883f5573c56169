"""Request validation: content type, strict JSON, schemas, rules, statistics, outlier models.

Write bodies pass the route's JSON Schema (2020-12) and rules; ingest batches also the stream's
schema, rules, statistical checks and outlier model, record by record. Validators are
compiled once at start. A failure names the JSON pointer of the failing field.
Never passes NaN/Infinity, duplicate keys, excessive nesting or an unparsed body upstream. An
ingest batch is forwarded as an envelope (accepted and quarantined records, with scores and
flags, plus the rejected indexes) from which the upstream writes the per-record receipt.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

import jsonschema
import structlog

from gateway.pipeline import Denial, RequestContext
from gateway.validation import anomaly
from gateway.validation.outliers import ModelUnavailableError
from gateway.validation.records import (
    RecordChecker,
    finding_entry,
    json_pointer,
    offending_key,
)
from gateway.validation.schemas import SchemaCheck
from gateway.validation.streams import StreamCatalog

if TYPE_CHECKING:
    from gateway.routes import Route, RouteTable
    from gateway.validation.baseline import Baselines
    from gateway.validation.outliers import ModelSlots
    from gateway.validation.records import Outcome
    from gateway.validation.rules import RuleSet
    from gateway.validation.streams import StreamSpec

log = structlog.get_logger("gateway.validation")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NDJSON = "application/x-ndjson"
ENVELOPE = "application/vnd.emp.ingest-batch+json"
# Batches above this many records are checked in a thread, so the event loop keeps serving.
_THREAD_AT = 64
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_AUDITED_FAILURES = 50  # per request, in the audit event and the log; the rest are counted


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
    """Strict JSON: no NaN/Infinity (nor overflow to it), no duplicate keys, no lone surrogate.

    An unpaired surrogate escape (one half of a UTF-16 pair alone) is not a character, and the
    upstream's DuckDB refuses it.
    """
    document = json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        object_pairs_hook=_no_duplicates,
    )
    if _SURROGATE_ESCAPE.search(text) is not None:  # rare: only then walk the strings
        _refuse_lone_surrogates(document)
    return document


def _refuse_lone_surrogates(document: Any) -> None:
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")  # a proper pair was decoded into one code point
            except UnicodeEncodeError:
                raise ValueError("a string holds an unpaired surrogate escape") from None


def json_depth(document: Any) -> int:
    """How deeply arrays and objects nest in a parsed document (a scalar is 0)."""
    depth, level = 0, [document]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [
            item
            for container in containers
            for item in (container.values() if isinstance(container, dict) else container)
        ]
    return depth


def _validator(schema: dict[str, Any]) -> SchemaCheck:
    return SchemaCheck(schema)


class ValidateStage:
    """Parses the body of write routes into ctx.payload and checks it against the schemas."""

    name = "validate"

    def __init__(
        self,
        table: RouteTable,
        *,
        max_body_bytes: int,
        max_depth: int = 32,
        streams: StreamCatalog | None = None,
        baselines: Baselines | None = None,
        models: ModelSlots | None = None,
    ) -> None:
        self._max_body = max_body_bytes
        self._max_depth = max_depth
        self._streams = streams or StreamCatalog(streams={}, mode="all_or_nothing")
        self._baselines = baselines
        self._models = models
        self._schemas: dict[str, SchemaCheck] = {}
        self._records: dict[str, SchemaCheck] = {}
        self._checkers: dict[tuple[str, str], RecordChecker] = {}
        self._routes = {route.name: route for route in table.routes}
        for route in table.routes:
            if route.schema is not None:
                self._schemas[route.name] = _validator(route.schema)
            if route.record_schema is not None:
                self._records[route.name] = _validator(route.record_schema)
        for spec in self._streams.streams.values():  # compile every listed stream up front
            for route in table.routes:
                if route.record_schema is not None:
                    self._checker(route, spec)

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
        if json_depth(ctx.payload) > self._max_depth + (content_type == NDJSON):
            raise Denial(
                "validation.malformed_json", f"body nests deeper than {self._max_depth} levels"
            )
        if route.name in self._records:
            await self._check_batch(ctx, route, ctx.payload)
        else:
            self._check(route, ctx.payload)
            if isinstance(ctx.payload, dict):
                changes = changed_fields(ctx.payload, route.sensitive)
                if sealed := {name: changes[name] for name in route.sealed if name in changes}:
                    ctx.sealed_detail["changes"] = sealed
                    changes = {name: "***" if name in sealed else v for name, v in changes.items()}
                ctx.detail["changes"] = changes

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
        hidden = route.sensitive | route.sealed
        schema = self._schemas.get(route.name)
        if schema is not None:
            _raise_first_error(schema, payload, prefix="", hidden=hidden)
        if route.rules:
            _raise_first_violation(route.rules, payload, prefix="", hidden=hidden)

    def _checker(self, route: Route, spec: StreamSpec) -> RecordChecker:
        """The stream's checker on this route (cached for listed streams)."""
        key = (route.name, spec.name)
        checker = self._checkers.get(key) if spec.listed else None
        if checker is None:
            rules = tuple(r for r in (route.rules, spec.rules) if r)
            checker = RecordChecker(
                spec, spec.record_schema or self._records.get(route.name), rules
            )
            if spec.listed:
                self._checkers[key] = checker
        return checker

    async def _check_batch(self, ctx: RequestContext, route: Route, payload: Any) -> None:
        """Every record's outcome; forward the survivors as an envelope, or refuse the batch."""
        stream = ctx.params.get("stream", route.name)
        spec = self._streams.spec(stream)
        if spec is None:
            raise Denial(
                "validation.unknown_stream", f"stream {stream!r} is not configured on this gateway"
            )
        batched = isinstance(payload, list)
        records = payload if batched else [payload]
        if not records:
            raise Denial("validation.schema", "the batch holds no records", pointer="")
        if len(records) > self._streams.max_records:
            raise Denial(
                "validation.batch_too_large",
                f"a batch holds at most {self._streams.max_records} records; split it",
            )
        checker = self._checker(route, spec)
        if len(records) > _THREAD_AT:
            outcomes = await asyncio.to_thread(checker.check, records, batched=batched)
        else:
            outcomes = checker.check(records, batched=batched)
        if not (spec.mode == "all_or_nothing" and _any_rejected(outcomes)):
            model_id = await self._flag_outliers(checker, outcomes)
        else:
            model_id = None
        summary = _summary(checker, outcomes, model_id)
        ctx.detail["validation"] = summary
        _log_failures(ctx, summary)
        stored = [o for o in outcomes if o.status != "rejected"]
        if not stored or (spec.mode == "all_or_nothing" and len(stored) < len(outcomes)):
            raise _batch_denial(spec, outcomes)
        ctx.body = json.dumps(
            _envelope(outcomes, model_id), separators=(",", ":"), allow_nan=False
        ).encode()
        ctx.upstream_content_type = ENVELOPE

    async def _flag_outliers(self, checker: RecordChecker, outcomes: list[Outcome]) -> str | None:
        """Statistical checks, then the model; the model's id when one scored the records."""
        spec = checker.spec
        if spec.statistics is not None:
            baseline = await self._baselines.current(spec.name) if self._baselines else None
            checker.flag_statistics(outcomes, baseline)
        config = spec.model
        if config is None:
            return None
        try:
            model = await self._models.current(spec.name, config.names) if self._models else None
        except ModelUnavailableError as exc:
            checker.flag_all(outcomes, "model.unavailable", str(exc), config.on_error)
            return None
        if model is None:
            message = "no outlier model trained for this stream yet"
            checker.flag_all(outcomes, "model.cold_start", message, config.on_cold_start)
            return None
        scored, rows = checker.model_rows(outcomes)
        if not rows:
            return model.meta.model_id
        try:
            # HBOS scores a small batch in ~0.2-0.4 ms; the others take milliseconds per call
            # (ECOD and COPOD re-rank the training set): off the event loop.
            if len(rows) > _THREAD_AT or model.meta.algorithm != "hbos":
                scores = await asyncio.to_thread(anomaly.score, model, rows)
            else:
                scores = anomaly.score(model, rows)
        except Exception as exc:
            log.exception("validation.model_failed", stream=spec.name)
            checker.flag_all(outcomes, "model.unavailable", type(exc).__name__, config.on_error)
            return None
        checker.flag_model(scored, scores, model)
        return model.meta.model_id


MAX_AUDITED_VALUE_CHARS = 200


def changed_fields(payload: dict[str, Any], sensitive: frozenset[str]) -> dict[str, Any]:
    """What a write asks to change, for the audit: each field's new value.

    A sensitive field shows `***`; long values are cut at 200 characters.
    """
    changes: dict[str, Any] = {}
    for name, value in payload.items():
        if name in sensitive:
            changes[name] = "***"
            continue
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, dict | list) else value
        if isinstance(text, str) and len(text) > MAX_AUDITED_VALUE_CHARS:
            text = text[:MAX_AUDITED_VALUE_CHARS] + "..."
        changes[name] = text
    return changes


def _any_rejected(outcomes: list[Outcome]) -> bool:
    return any(o.failures for o in outcomes)


def _envelope(outcomes: list[Outcome], model_id: str | None) -> dict[str, Any]:
    """What the upstream stores: survivors with score and flags, and the rejected indexes."""
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for outcome in outcomes:
        if outcome.failures:
            failures = [finding_entry(outcome, f) for f in outcome.findings()]
            rejected.append({"index": outcome.index, "failures": failures})
            continue
        entry: dict[str, Any] = {
            "index": outcome.index, "status": outcome.status, "record": outcome.record,
        }  # fmt: skip
        if outcome.score is not None:
            entry["score"], entry["model"] = outcome.score, model_id
        if outcome.flags:
            entry["flags"] = [finding_entry(outcome, f) for f in outcome.findings()]
        records.append(entry)
    return {"received": len(outcomes), "records": records, "rejected": rejected}


def _summary(
    checker: RecordChecker, outcomes: list[Outcome], model_id: str | None
) -> dict[str, Any]:
    """The audit's view of a batch: counts, rules hit, and the first failures with values."""
    spec = checker.spec
    statuses = Counter(o.status for o in outcomes)
    by_rule: dict[str, Counter[str]] = {"rejected": Counter(), "quarantined": Counter()}
    failures: list[dict[str, Any]] = []
    for outcome in outcomes:
        status = outcome.status
        if status == "accepted":
            continue
        findings = outcome.findings()
        by_rule[status].update({f.rule for f in findings})
        for finding in findings:
            if len(failures) < MAX_AUDITED_FAILURES:
                failures.append({
                    "index": outcome.index, "outcome": status,
                    **finding_entry(outcome, finding),
                    "value": checker.shown_value(outcome, finding.pointer),
                })  # fmt: skip
    total = sum(len(o.findings()) for o in outcomes if o.status != "accepted")
    return {
        "stream": spec.name,
        "listed": spec.listed,
        "mode": spec.mode,
        "received": len(outcomes),
        "accepted": statuses["accepted"],
        "quarantined": statuses["quarantined"],
        "rejected": statuses["rejected"],
        "model": model_id,
        "rules": {k: dict(v) for k, v in by_rule.items() if v},
        "failures": failures,
        "failures_omitted": total - len(failures),
    }


def _log_failures(ctx: RequestContext, summary: dict[str, Any]) -> None:
    if not summary["failures"]:
        return
    subject = ctx.principal.sub if ctx.principal else None
    for failure in summary["failures"]:
        log.info(
            "validation.record_failed", request_id=ctx.request_id, subject=subject,
            stream=summary["stream"], **failure,
        )  # fmt: skip
    log.info(
        "validation.batch_checked", request_id=ctx.request_id, subject=subject,
        **{k: summary[k] for k in ("stream", "received", "accepted", "quarantined", "rejected")},
        failures_omitted=summary["failures_omitted"],
    )  # fmt: skip


def _batch_denial(spec: StreamSpec, outcomes: list[Outcome]) -> Denial:
    """422 naming the first failure, with a receipt listing every rejected record."""
    failing = [o for o in outcomes if o.failures]
    first_outcome = failing[0]
    first = first_outcome.failures[0]
    pointer = first_outcome.prefix + first.pointer
    denial = Denial(
        first.reason, f"{pointer or '/'}: {first.message}"[:500], pointer=pointer, rule=first.rule
    )
    denial.detail["message"] = first.message[:500]
    note = "no record passed" if len(failing) == len(outcomes) else "nothing was stored"
    denial.receipt = {
        "stream": spec.name,
        "mode": spec.mode,
        "received": len(outcomes),
        "stored": 0,
        "rejected": len(failing),
        "note": note,
        "records": [
            {"index": o.index, "status": "rejected",
             "failures": [finding_entry(o, f) for f in o.findings()]}
            for o in failing
        ],
    }  # fmt: skip
    return denial


def _raise_first_error(
    check: SchemaCheck, instance: Any, *, prefix: str, hidden: frozenset[str] = frozenset()
) -> None:
    errors = check.errors(instance)
    if not errors:
        return
    error = jsonschema.exceptions.best_match(iter(errors))
    assert error is not None  # noqa: S101 - best_match of a non-empty list
    path = [*error.absolute_path, *offending_key(error)]
    pointer = prefix + json_pointer(path)
    message = error.message
    if path and path[0] in hidden:
        # jsonschema quotes the value ("'...' is too long"): a sensitive or sealed field's
        # value must not reach the audit trail through a refusal either.
        message = f"the value fails the schema's {error.validator!r} check (not shown)"
    raise Denial("validation.schema", f"{pointer or '/'}: {message}"[:500], pointer=pointer)


def _raise_first_violation(
    rules: RuleSet, record: Any, *, prefix: str, hidden: frozenset[str] = frozenset()
) -> None:
    """The route's rules, after the schema passed: the first violation refuses (422)."""
    violations = rules.check(record)
    if not violations:
        return
    first = violations[0]
    pointer = prefix + first.pointer
    field = first.pointer.split("/")[1] if first.pointer.startswith("/") else ""
    message = f"rule {first.rule!r} failed (value not shown)" if field in hidden else first.message
    denial = Denial(
        "validation.rule",
        f"{pointer or '/'}: {message}"[:500],
        pointer=pointer,
        rule=first.rule,
    )
    # Denial's own `message` parameter is the client-facing text; the detail carries the rule's.
    denial.detail["message"] = message[:500]
    raise denial
