"""SQL for the ingest quarantine: keep flagged records aside, list them, accept or discard them.

Reviews check and change a row in one transaction on the single writer thread, so they must
never be called from a reader: that is what makes "only a pending row" race-free.
"""

import json
import uuid
from collections.abc import Sequence
from typing import Final

from upstream.database import Cursor
from upstream.envelope import ScoredRecord
from upstream.errors import conflict, not_found
from upstream.sealing import Sealer
from upstream.store.rows import row_to_dict

PENDING: Final = "pending"
ACCEPTED: Final = "accepted"
DISCARDED: Final = "discarded"
STATUSES: Final = (PENDING, ACCEPTED, DISCARDED)

_ITEM_COLUMNS = (
    "id",
    "batch_id",
    "record_index",
    "record",
    "score",
    "model",
    "flags",
    "received_at",
    "received_by",
    "status",
    "reviewed_by",
    "reviewed_at",
    "review_note",
)
_SELECT_ITEM = f"SELECT {', '.join(_ITEM_COLUMNS)} FROM ingest_quarantine"  # noqa: S608  # nosec B608  # fixed column names
_SELECT_BY_ID = f"{_SELECT_ITEM} WHERE id = ?"
_NOW = "CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP)"

# One statement for every quarantined record of an envelope, like the ingest_records insert.
_INSERT = """
INSERT INTO ingest_quarantine
    (stream, batch_id, record_index, record, score, model, flags, received_by)
SELECT ?, ?, record_index, record, score, model, CAST(flags AS JSON), ?
FROM (
    SELECT unnest(?::INTEGER[]) AS record_index, unnest(?::VARCHAR[]) AS record,
           unnest(?::DOUBLE[]) AS score, unnest(?::VARCHAR[]) AS model,
           unnest(?::VARCHAR[]) AS flags
)
RETURNING record_index, id
"""
_PAGE = f"""
{_SELECT_ITEM}
WHERE stream = ? AND (? IS NULL OR status = ?)
ORDER BY id DESC
LIMIT ? OFFSET ?
"""  # nosec B608  # only the fixed select above is interpolated
_STATE = "SELECT stream, status, reviewed_by FROM ingest_quarantine WHERE id = ?"
# The copy keeps the record's provenance; only batch_seq is new, so it reads as newest.
# The record comes opened: accepted, it is plain statistics and training data like any other.
_COPY_TO_RECORDS = """
INSERT INTO ingest_records
    (stream, batch_id, batch_seq, record_index, record, received_at, received_by, score, model)
SELECT stream, batch_id, nextval('ingest_batches_seq'), record_index, CAST(? AS JSON),
       received_at, received_by, score, model
FROM ingest_quarantine
WHERE id = ?
"""
_RECORD = "SELECT batch_id, record_index, record FROM ingest_quarantine WHERE id = ?"
_REVIEW = f"""
UPDATE ingest_quarantine
SET status = ?, reviewed_by = ?, reviewed_at = {_NOW}, review_note = ?
WHERE id = ?
"""  # noqa: S608  # nosec B608  # only the fixed clock expression is interpolated

Item = dict[str, object]


def quarantine_records(
    cursor: Cursor,
    sealer: Sealer,
    stream: str,
    batch_id: uuid.UUID,
    records: Sequence[ScoredRecord],
    *,
    received_by: str | None,
) -> dict[int, int]:
    """Store flagged records as pending and return the quarantine id of each record index."""
    if not records:
        return {}
    rows = cursor.execute(
        _INSERT,
        [
            stream,
            batch_id,
            received_by,
            [record.index for record in records],
            [sealer.seal_record(batch_id, record.index, record.record) for record in records],
            [record.score for record in records],
            [record.model for record in records],
            [json.dumps(record.flags, separators=(",", ":")) for record in records],
        ],
    ).fetchall()
    return {int(record_index): int(row_id) for record_index, row_id in rows}


def _item(sealer: Sealer, row: Sequence[object]) -> Item:
    values = row_to_dict(_ITEM_COLUMNS, row)
    row_id = int(str(values["id"]))
    index = int(str(values["record_index"]))
    record = sealer.open_record(values["batch_id"], index, str(values["record"]))
    return {
        "id": row_id,
        "batch_id": str(values["batch_id"]),
        "index": index,
        "record": json.loads(record),
        "score": values["score"],
        "model": values["model"],
        "flags": json.loads(str(values["flags"])),
        "received_at": values["received_at"],
        "received_by": values["received_by"],
        "status": values["status"],
        "reviewed_by": values["reviewed_by"],
        "reviewed_at": values["reviewed_at"],
        "review_note": sealer.open_note(row_id, values["review_note"]),
    }


def list_quarantine(
    cursor: Cursor, sealer: Sealer, stream: str, status: str | None, *, limit: int, offset: int
) -> list[Item]:
    """A page of a stream's quarantined records, newest first; ``status`` None means all."""
    rows = cursor.execute(_PAGE, [stream, status, status, limit, offset]).fetchall()
    return [_item(sealer, row) for row in rows]


def _check_reviewable(cursor: Cursor, stream: str, row_id: int) -> None:
    state = cursor.execute(_STATE, [row_id]).fetchone()
    # Another stream's id answers exactly like a missing one: ids must not leak across streams.
    if state is None or state[0] != stream:
        raise not_found(f"stream '{stream}' has no quarantined record with id {row_id}")
    _, status, reviewed_by = state
    if status != PENDING:
        by = f" by {reviewed_by}" if reviewed_by else ""
        raise conflict(
            f"quarantined record {row_id} was already {status}{by}; only pending records"
            " can be accepted or discarded"
        )


def review(
    cursor: Cursor,
    sealer: Sealer,
    stream: str,
    row_id: int,
    *,
    decision: str,
    reviewed_by: str | None,
    note: str | None,
) -> Item:
    """Accept (copy into ingest_records) or discard one pending record; return it updated."""
    if decision not in {ACCEPTED, DISCARDED}:
        raise ValueError(f"a review decides accepted or discarded, not {decision!r}")
    _check_reviewable(cursor, stream, row_id)
    if decision == ACCEPTED:
        stored = cursor.execute(_RECORD, [row_id]).fetchone()
        if stored is None:
            raise RuntimeError(f"quarantined record {row_id} vanished during its review")
        batch_id, index, token = stored
        cursor.execute(_COPY_TO_RECORDS, [sealer.open_record(batch_id, index, token), row_id])
    cursor.execute(_REVIEW, [decision, reviewed_by, sealer.seal_note(row_id, note), row_id])
    row = cursor.execute(_SELECT_BY_ID, [row_id]).fetchone()
    if row is None:
        raise RuntimeError(f"quarantined record {row_id} vanished during its review")
    return _item(sealer, row)
