"""Parses an ingest body (JSON array or object, or NDJSON) into records.

Pure parsing: it must never touch the database, and it refuses the whole batch on the
first bad record, naming its index or line, so a batch is stored entirely or not at all.
"""

import json

from upstream.errors import ApiError, ReasonId, bad_request

MAX_RECORDS = 10_000
JSON = "application/json"
NDJSON = "application/x-ndjson"

Record = dict[str, object]


def _reject_constant(name: str) -> object:
    # Python accepts NaN and Infinity; JSON (and DuckDB's JSON type) does not.
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> object:
    """``json.loads`` without NaN/Infinity; deep nesting surfaces as ValueError."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _parse_json(text: str) -> list[Record]:
    try:
        document = loads_strict(text)
    except ValueError as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    items = document if isinstance(document, list) else [document]
    if len(items) > MAX_RECORDS:
        raise _too_many()
    records: list[Record] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"record {index} is not a JSON object")
        records.append(item)
    return records


def _parse_ndjson(text: str) -> list[Record]:
    # Split on \n only: NDJSON lines end there, while str.splitlines() would also split
    # on U+2028, which JSON strings may legally contain unescaped.
    records: list[Record] = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if len(records) == MAX_RECORDS:
            raise _too_many()
        try:
            item = loads_strict(line)
        except ValueError as error:
            raise bad_request(f"line {line_number} is not valid JSON: {error}") from None
        if not isinstance(item, dict):
            raise bad_request(f"line {line_number} is not a JSON object")
        records.append(item)
    return records


def _too_many() -> ApiError:
    return bad_request(f"a batch holds at most {MAX_RECORDS} records; split it")


def parse_batch(content_type: str, body: bytes) -> list[Record]:
    """Records of one batch, or a 400/415 naming what is wrong."""
    if content_type not in {JSON, NDJSON}:
        raise ApiError(
            415,
            ReasonId.UNSUPPORTED_MEDIA_TYPE,
            f"send records as {JSON} or {NDJSON}, not {content_type or 'no content type'}",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8") from None
    records = _parse_json(text) if content_type == JSON else _parse_ndjson(text)
    if not records:
        raise bad_request("the batch is empty; send at least one record")
    return records
