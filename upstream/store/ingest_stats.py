"""SQL over a stream's accepted numbers: per-field statistics and rows of model features.

Field paths reach SQL only as bound parameters, never as SQL text, and only accepted records
(``ingest_records``) are read: quarantined ones must never feed statistics or training.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from upstream.database import Cursor

# What DuckDB's json_type calls a JSON number; "12" (VARCHAR) and true (BOOLEAN) are not.
_NUMBER_TYPES = "['BIGINT', 'UBIGINT', 'DOUBLE']"
STAT_NAMES = ("count", "mean", "stddev", "min", "max", "median", "mad", "q1", "q3")

# Each record is parsed once for all paths (json_extract and json_type take a list of paths),
# then its cells are unnested beside their position. Measured: 50,000 records x 5 fields in
# ~150 ms, about twice as fast as one json_extract per (record, path) pair.
_STATS = f"""
WITH recent AS (
    SELECT json_extract(record, ?::VARCHAR[]) AS cells, json_type(record, ?::VARCHAR[]) AS types
    FROM ingest_records
    WHERE stream = ? AND received_at >= ?
    ORDER BY batch_seq DESC, record_index DESC
    LIMIT ?
),
unnested AS (
    SELECT unnest(range(?)) AS position, unnest(cells) AS cell, unnest(types) AS type
    FROM recent
),
numbers AS (
    SELECT position, TRY_CAST(cell AS DOUBLE) AS value
    FROM unnested
    WHERE list_contains({_NUMBER_TYPES}, type)
)
SELECT position, count(value), avg(value), stddev_samp(value), min(value), max(value),
       median(value), mad(value), quantile_cont(value, 0.25), quantile_cont(value, 0.75)
FROM numbers
WHERE isfinite(value)
GROUP BY position
"""  # noqa: S608  # nosec B608  # only the fixed type list is interpolated

# list_has_all ignores NULLs (a missing field), so the non-NULL types are counted too.
# DuckDB writes the rows' JSON itself: measured on 50,000 rows x 4 fields, 170 ms in all,
# against 550 ms for fetching Python lists and encoding them with json.dumps.
_FEATURES = f"""
WITH typed AS (
    SELECT batch_seq, record_index, json_type(record, ?::VARCHAR[]) AS types,
           TRY_CAST(json_extract(record, ?::VARCHAR[]) AS DOUBLE[]) AS cells
    FROM ingest_records
    WHERE stream = ? AND received_at >= ?
),
chosen AS (
    SELECT batch_seq, record_index, cells
    FROM typed
    WHERE list_has_all({_NUMBER_TYPES}, types)
      AND list_aggregate(types, 'count') = ?
      AND isfinite(list_aggregate(cells, 'min')) AND isfinite(list_aggregate(cells, 'max'))
    ORDER BY batch_seq DESC, record_index DESC
    LIMIT ?
)
SELECT count(*),
       CAST(to_json(COALESCE(
           list(cells ORDER BY batch_seq DESC, record_index DESC), []
       )) AS VARCHAR)
FROM chosen
"""  # noqa: S608  # nosec B608  # only the fixed type list is interpolated

FieldStats = dict[str, object]


def _empty_stats() -> FieldStats:
    stats: FieldStats = dict.fromkeys(STAT_NAMES)
    stats["count"] = 0
    return stats


def field_stats(
    cursor: Cursor, stream: str, paths: Sequence[str], since: datetime, max_records: int
) -> list[FieldStats]:
    """Statistics of each JSON path's numbers over the newest records since ``since``."""
    path_list = list(paths)
    rows = cursor.execute(
        _STATS, [path_list, path_list, stream, since, max_records, len(path_list)]
    ).fetchall()
    results = [_empty_stats() for _ in path_list]
    for position, *values in rows:
        results[int(position)] = dict(zip(STAT_NAMES, values, strict=True))
    return results


@dataclass(frozen=True, slots=True)
class FeatureRows:
    """Feature rows as one JSON array text (``[[1.0, 2.0], ...]``) and how many it holds."""

    count: int
    json: str


def feature_rows(
    cursor: Cursor, stream: str, paths: Sequence[str], since: datetime, limit: int
) -> FeatureRows:
    """Newest-first rows of floats, one per record whose every path is a JSON number."""
    path_list = list(paths)
    row = cursor.execute(
        _FEATURES, [path_list, path_list, stream, since, len(path_list), limit]
    ).fetchone()
    if row is None:
        raise RuntimeError("the features query returned no row")
    return FeatureRows(count=int(row[0]), json=str(row[1]))
