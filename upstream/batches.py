"""Parses an ingest body (JSON array or object, or NDJSON) into records, and re-serialises them.

Pure parsing: it must never touch the database, and it refuses the whole batch on the
first bad record, naming its index or line, so a batch is stored entirely or not at all.
"""

import json
import re

from upstream.errors import ApiError, ReasonId, bad_request

MAX_RECORDS = 10_000
JSON = "application/json"
NDJSON = "application/x-ndjson"
# The gateway's validated batch: see upstream/envelope.py.
ENVELOPE = "application/vnd.emp.ingest-batch+json"

Record = dict[str, object]

# One encoder for every record: json.dumps with options builds a new one per call, which was
# a third of the time spent re-serialising a 10,000-record batch. allow_nan=False: a literal
# like 1e400 parses to inf, which is not JSON; storing it would poison statistics and make
# the record unreadable by strict clients.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> object:
    # Python accepts NaN and Infinity; JSON (and DuckDB's JSON type) does not.
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str) -> object:
    """``json.loads`` without NaN/Infinity, too deep nesting or an unpaired surrogate.

    Each surfaces as ValueError; DuckDB's JSON type would refuse a lone surrogate at insert.
    """
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        try:
            # ensure_ascii=False re-emits every string as itself; a lone surrogate cannot be
            # encoded as UTF-8, while a proper pair was decoded into one character.
            json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds an unpaired surrogate escape") from None
    return document


def serialise_record(record: Record, where: str) -> str:
    """Compact JSON text of a record for DuckDB, or a 400 naming ``where`` it cannot be stored."""
    try:
        return _ENCODER.encode(record)
    except ValueError:
        raise bad_request(f"{where} holds a number too large for a double") from None


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


def decode_body(body: bytes) -> str:
    """The body as text, or a 400 when it is not UTF-8."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8") from None


def parse_batch(content_type: str, body: bytes) -> list[Record]:
    """Records of one batch, or a 400/415 naming what is wrong."""
    if content_type not in {JSON, NDJSON}:
        raise ApiError(
            415,
            ReasonId.UNSUPPORTED_MEDIA_TYPE,
            f"send records as {JSON}, {NDJSON} or {ENVELOPE},"
            f" not {content_type or 'no content type'}",
        )
    text = decode_body(body)
    records = _parse_json(text) if content_type == JSON else _parse_ndjson(text)
    if not records:
        raise bad_request("the batch is empty; send at least one record")
    return records
