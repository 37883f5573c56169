"""Parses the gateway's validated batch envelope into accepted, quarantined and rejected records.

Pure parsing: it must never touch the database, and it trusts nothing the gateway sent until
it is checked, refusing the whole envelope with a 400 naming the JSON pointer at fault.
"""

import math
from dataclasses import dataclass

from upstream.batches import MAX_RECORDS, decode_body, loads_strict, serialise_record
from upstream.errors import bad_request

ACCEPTED = "accepted"
QUARANTINED = "quarantined"
MAX_TEXT = 500
MAX_MODEL = 100
MAX_REASONS = 50

_ENVELOPE_KEYS = ({"received", "records"}, {"rejected"})
_RECORD_KEYS = ({"index", "status", "record"}, {"score", "model", "flags"})
_REJECTED_KEYS = ({"index", "failures"}, set[str]())
_REASON_KEYS = ({"pointer", "rule", "message"}, set[str]())

Reason = dict[str, str]


@dataclass(frozen=True, slots=True)
class ScoredRecord:
    """An accepted or quarantined record, serialised for storage; accepted ones have no flags."""

    index: int
    record: str
    score: float | None
    model: str | None
    flags: list[Reason]


@dataclass(frozen=True, slots=True)
class RejectedRecord:
    """A record the gateway refused, kept only for the receipt."""

    index: int
    failures: list[Reason]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One checked envelope: every index from 0 to ``received - 1`` appears in one list."""

    received: int
    accepted: list[ScoredRecord]
    quarantined: list[ScoredRecord]
    rejected: list[RejectedRecord]


def _object(value: object, pointer: str, keys: tuple[set[str], set[str]]) -> dict[str, object]:
    required, optional = keys
    if not isinstance(value, dict):
        raise bad_request(f"{pointer or 'the envelope'} must be a JSON object")
    for key in value:
        if key not in required and key not in optional:
            allowed = ", ".join(sorted(required | optional))
            raise bad_request(f"{pointer}/{key} is not allowed here; allowed keys: {allowed}")
    for key in sorted(required):
        if key not in value:
            raise bad_request(f"{pointer}/{key} is required")
    return value


def _integer(value: object, pointer: str, minimum: int, maximum: int) -> int:
    # bool is an int in Python; `true` is not an index.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise bad_request(f"{pointer} must be an integer from {minimum} to {maximum}")
    return value


def _text(value: object, pointer: str, maximum: int) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{pointer} must be a string")
    if len(value) > maximum:
        raise bad_request(f"{pointer} is longer than {maximum} characters")
    return value


def _list(value: object, pointer: str, maximum: int) -> list[object]:
    if not isinstance(value, list):
        raise bad_request(f"{pointer} must be a JSON array")
    if len(value) > maximum:
        raise bad_request(f"{pointer} holds more than {maximum} items")
    return value


def _score(value: object, pointer: str) -> float | None:
    if value is None:
        return None
    # A literal like 1e400 parses to inf, which loads_strict cannot see.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{pointer} must be a finite number or null")
    return float(value)


def _model(value: object, pointer: str) -> str | None:
    return None if value is None else _text(value, pointer, MAX_MODEL)


def _reasons(value: object, pointer: str) -> list[Reason]:
    items = _list(value, pointer, MAX_REASONS)
    if not items:
        raise bad_request(f"{pointer} must name at least one reason")
    reasons: list[Reason] = []
    for position, item in enumerate(items):
        where = f"{pointer}/{position}"
        fields = _object(item, where, _REASON_KEYS)
        reasons.append({key: _text(fields[key], f"{where}/{key}", MAX_TEXT) for key in fields})
    return reasons


class _IndexLedger:
    """Tracks which indexes were seen, so each appears exactly once across both lists."""

    def __init__(self, received: int) -> None:
        self.received = received
        self.seen: set[int] = set()

    def claim(self, value: object, pointer: str) -> int:
        index = _integer(value, pointer, 0, self.received - 1)
        if index in self.seen:
            raise bad_request(f"{pointer}: index {index} appears more than once")
        self.seen.add(index)
        return index

    def check_complete(self) -> None:
        for index in range(self.received):
            if index not in self.seen:
                raise bad_request(
                    f"index {index} is missing; each index from 0 to received - 1 must"
                    " appear once in /records or /rejected"
                )


def _scored(item: object, pointer: str, ledger: _IndexLedger) -> tuple[str, ScoredRecord]:
    fields = _object(item, pointer, _RECORD_KEYS)
    index = ledger.claim(fields["index"], f"{pointer}/index")
    status = fields["status"]
    if status not in {ACCEPTED, QUARANTINED}:
        raise bad_request(f"{pointer}/status must be '{ACCEPTED}' or '{QUARANTINED}'")
    record = fields["record"]
    if not isinstance(record, dict):
        raise bad_request(f"{pointer}/record must be a JSON object")
    flags: list[Reason] = []
    if status == QUARANTINED:
        if "flags" not in fields:
            raise bad_request(f"{pointer}/flags is required for a quarantined record")
        flags = _reasons(fields["flags"], f"{pointer}/flags")
    elif fields.get("flags") not in (None, []):
        raise bad_request(f"{pointer}/flags must be empty for an accepted record")
    scored = ScoredRecord(
        index=index,
        record=serialise_record(record, f"{pointer}/record"),
        score=_score(fields.get("score"), f"{pointer}/score"),
        model=_model(fields.get("model"), f"{pointer}/model"),
        flags=flags,
    )
    return str(status), scored


def _rejected(item: object, pointer: str, ledger: _IndexLedger) -> RejectedRecord:
    fields = _object(item, pointer, _REJECTED_KEYS)
    index = ledger.claim(fields["index"], f"{pointer}/index")
    return RejectedRecord(index=index, failures=_reasons(fields["failures"], f"{pointer}/failures"))


def _check_envelope(document: object) -> Envelope:
    fields = _object(document, "", _ENVELOPE_KEYS)
    ledger = _IndexLedger(_integer(fields["received"], "/received", 1, MAX_RECORDS))
    records = _list(fields["records"], "/records", MAX_RECORDS)
    if not records:
        raise bad_request("/records is empty; an envelope must store at least one record")
    accepted: list[ScoredRecord] = []
    quarantined: list[ScoredRecord] = []
    for position, item in enumerate(records):
        status, scored = _scored(item, f"/records/{position}", ledger)
        (accepted if status == ACCEPTED else quarantined).append(scored)
    rejected: list[RejectedRecord] = []
    for position, item in enumerate(_list(fields.get("rejected", []), "/rejected", MAX_RECORDS)):
        rejected.append(_rejected(item, f"/rejected/{position}", ledger))
    ledger.check_complete()
    return Envelope(
        received=ledger.received, accepted=accepted, quarantined=quarantined, rejected=rejected
    )


def parse_envelope(body: bytes) -> Envelope:
    """The checked envelope of one batch, or a 400 naming the JSON pointer at fault."""
    try:
        document = loads_strict(decode_body(body))
    except ValueError as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    return _check_envelope(document)
