"""The outcome of each record of an ingest batch: accepted, quarantined or rejected, and why.

Stages run in order and each is optional: the record schema, the rules, the statistical checks,
the outlier model. Schema and rules reject; a statistical or model flag quarantines or rejects
by the stream's config. Findings carry a JSON pointer (relative to the record), the rule id and
a message; a value in a field marked sensitive is never shown, and neither is a message that
would quote it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jsonschema

from gateway.validation.baseline import outlier_message
from gateway.validation.rules import MISSING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from gateway.validation.anomaly import TrainedModel
    from gateway.validation.baseline import Baseline
    from gateway.validation.rules import FieldPath, RuleSet
    from gateway.validation.schemas import SchemaCheck
    from gateway.validation.streams import Action, StreamSpec

MASK = "***"
MAX_FINDINGS_PER_RECORD = 10
MAX_MESSAGE_CHARS = 300
_VALUE_CHARS = 120
# The reason id a rejection carries, by the stage that found it.
SCHEMA, RULE, OUTLIER = "validation.schema", "validation.rule", "validation.outlier"


class Finding(NamedTuple):
    """One problem with a record: where (pointer in the record), which rule, why."""

    pointer: str
    rule: str
    message: str
    reason: str


@dataclass(slots=True)
class Outcome:
    """One record's fate; `prefix` is its pointer in the batch ("/3", or "" for a lone object)."""

    index: int
    record: Any
    prefix: str
    failures: list[Finding] = field(default_factory=list)
    flags: list[Finding] = field(default_factory=list)
    score: float | None = None

    @property
    def status(self) -> str:
        """Rejected (any failure), quarantined (flags only) or accepted."""
        if self.failures:
            return "rejected"
        return "quarantined" if self.flags else "accepted"

    def add(self, finding: Finding, action: Action) -> None:
        """File a finding by the action its check is configured with."""
        if action == "reject":
            self.failures.append(finding._replace(reason=OUTLIER))
        elif action == "quarantine":
            self.flags.append(finding)

    def findings(self) -> list[Finding]:
        """What the receipt lists for this record: failures, or else flags."""
        return (self.failures or self.flags)[:MAX_FINDINGS_PER_RECORD]


class RecordChecker:
    """A stream's schema and rules (synchronous) plus the statistical and model flags."""

    def __init__(
        self,
        spec: StreamSpec,
        schema: SchemaCheck | None,
        rules: tuple[RuleSet, ...],
    ) -> None:
        self.spec = spec
        self._schema = schema
        self._rules = rules

    def check(self, records: list[Any], *, batched: bool) -> list[Outcome]:
        """Schema then rules on every record (rules only where the schema passed)."""
        outcomes = []
        for index, record in enumerate(records):
            outcome = Outcome(index, record, f"/{index}" if batched else "")
            outcome.failures.extend(self._structural(record))
            outcomes.append(outcome)
        return outcomes

    def _structural(self, record: Any) -> list[Finding]:
        if not isinstance(record, dict):
            return [Finding("", "record.type", "a record must be a JSON object", SCHEMA)]
        if self._schema is not None:
            errors = list(self._schema_errors(record))
            if errors:
                return errors
        found: list[Finding] = []
        for rules in self._rules:
            found.extend(Finding(v.pointer, v.rule, v.message, RULE) for v in rules.check(record))
        return found[:MAX_FINDINGS_PER_RECORD]

    def _schema_errors(self, record: Any) -> Iterator[Finding]:
        assert self._schema is not None  # noqa: S101 - checked by the caller
        errors = self._schema.errors(record)
        if not errors:
            return
        best = jsonschema.exceptions.best_match(iter(errors))  # the message a person should see
        ordered = [best, *(e for e in errors if e is not best)]
        for error in ordered[:MAX_FINDINGS_PER_RECORD]:
            pointer = json_pointer([*error.absolute_path, *offending_key(error)])
            message = error.message
            if self.spec.is_sensitive(pointer):
                message = f"the value fails the schema's {error.validator!r} check"
            yield Finding(pointer, f"schema.{error.validator}", message[:MAX_MESSAGE_CHARS], SCHEMA)

    def flag_statistics(self, outcomes: list[Outcome], baseline: Baseline | None) -> None:
        """IQR, z-score and MAD checks on the records still standing."""
        stats = self.spec.statistics
        if stats is None:
            return
        standing = [o for o in outcomes if not o.failures]
        if baseline is None:
            message = "no fresh statistical baseline for this stream"
            for outcome in standing:
                outcome.add(Finding("", "stats.unavailable", message, OUTLIER), stats.on_error)
            return
        for check in stats.checks:
            summary = baseline.fields.get(check.field.dotted)
            if summary is None or summary.count < stats.min_samples:
                count = summary.count if summary else 0
                message = (
                    f"baseline has {count} samples of {check.field.dotted}, fewer than "
                    f"min_samples {stats.min_samples}"
                )
                cold = Finding(check.field.pointer, "stats.cold_start", message, OUTLIER)
                for outcome in standing:
                    outcome.add(cold, stats.on_cold_start)
                continue
            for outcome in standing:
                value = check.field.get(outcome.record)
                if not _is_number(value):
                    continue
                found = outlier_message(check, summary, float(value))
                if found is not None:
                    finding = Finding(check.field.pointer, check.rule, found, OUTLIER)
                    outcome.add(finding, stats.action)

    def model_rows(self, outcomes: list[Outcome]) -> tuple[list[Outcome], list[list[float]]]:
        """The standing records the model can score, with their feature rows.

        A record missing a feature (or holding a non-number there) cannot be scored: it is
        flagged `model.unscorable` under the model's on_error action.
        """
        model = self.spec.model
        if model is None:
            return [], []
        scored: list[Outcome] = []
        rows: list[list[float]] = []
        for outcome in outcomes:
            if outcome.failures:
                continue
            row = _features(model.features, outcome.record)
            if row is None:
                message = f"cannot score: needs numbers in {list(model.names)}"
                outcome.add(Finding("", "model.unscorable", message, OUTLIER), model.on_error)
                continue
            scored.append(outcome)
            rows.append(row)
        return scored, rows

    def flag_model(self, scored: list[Outcome], scores: list[float], model: TrainedModel) -> None:
        """Record each score and flag those above the model's threshold."""
        config = self.spec.model
        if config is None:
            return
        meta = model.meta
        for outcome, score in zip(scored, scores, strict=True):
            if not math.isfinite(score):
                message = "the model gave no finite score"
                outcome.add(Finding("", "model.unavailable", message, OUTLIER), config.on_error)
                continue
            outcome.score = score
            if score > meta.threshold:
                message = f"outlier score {score:.4g} is above the threshold {meta.threshold:.4g}"
                outcome.add(Finding("", f"model.{meta.algorithm}", message, OUTLIER), config.action)

    def flag_all(self, outcomes: list[Outcome], rule: str, message: str, action: Action) -> None:
        """The same flag on every standing record (model cold start or model error)."""
        for outcome in outcomes:
            if not outcome.failures:
                outcome.add(Finding("", rule, message[:MAX_MESSAGE_CHARS], OUTLIER), action)

    def shown_value(self, outcome: Outcome, pointer: str) -> Any:
        """The offending value for logs and audit: masked when sensitive, truncated, or None."""
        if self.spec.is_sensitive(pointer) or (pointer == "" and self.spec.sensitive):
            return MASK
        value = value_at(outcome.record, pointer)
        if value is MISSING:
            return None
        text = json.dumps(value, separators=(",", ":"), default=str)
        return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + "..."


def finding_entry(outcome: Outcome, finding: Finding) -> dict[str, str]:
    """A finding as the receipt shows it, with its pointer in the batch."""
    pointer = outcome.prefix + finding.pointer
    if len(pointer) > MAX_MESSAGE_CHARS:  # a record with a very long key: keep the receipt valid
        pointer = pointer[: MAX_MESSAGE_CHARS - 3] + "..."
    return {"pointer": pointer, "rule": finding.rule[:MAX_MESSAGE_CHARS],
            "message": finding.message}  # fmt: skip


def value_at(record: Any, pointer: str) -> Any:
    """The value an RFC 6901 pointer names in `record`, or MISSING."""
    if not pointer:
        return record
    value = record
    for raw in pointer[1:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def _is_number(value: Any) -> bool:
    """A JSON number a float can hold (an integer of 400 digits is not: it overflows)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _features(features: tuple[FieldPath, ...], record: Any) -> list[float] | None:
    row: list[float] = []
    for feature in features:
        value = feature.get(record)
        if not _is_number(value):
            return None
        row.append(float(value))
    return row


def json_pointer(path: list[Any]) -> str:
    """RFC 6901 pointer for a jsonschema error path."""
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in path]
    return "/" + "/".join(parts) if parts else ""


def offending_key(error: jsonschema.ValidationError) -> list[str]:
    """For missing or unexpected properties, the pointer names the property, not its parent."""
    instance = error.instance
    if error.validator == "required" and isinstance(error.validator_value, list):
        present = instance if isinstance(instance, dict) else {}
        return [k for k in error.validator_value if k not in present][:1]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        return [k for k in instance if k not in known][:1]
    return []
