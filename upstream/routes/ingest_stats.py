"""``/api/ingest/{stream}/stats`` and ``/features``: numbers of a stream's accepted records.

Statistics feed the gateway's checks and features train its outlier model, so both must
read accepted records only, never the quarantine.
"""

import json
from datetime import UTC, datetime, timedelta

from aiohttp import web

from upstream.fields import json_path, parse_fields
from upstream.routes.common import database
from upstream.routes.streams import parse_positive, refuse_unknown_parameters, stream_name
from upstream.store.ingest_stats import feature_rows, field_stats
from upstream.store.rows import json_value

STATS_PATH = "/api/ingest/{stream}/stats"
FEATURES_PATH = "/api/ingest/{stream}/features"
STATS_WINDOW_HOURS = 24
MAX_STATS_WINDOW_HOURS = 8760  # a year
DEFAULT_MAX_RECORDS = 50_000
MAX_MAX_RECORDS = 1_000_000
FEATURES_WINDOW_HOURS = 720  # 30 days
MAX_FEATURES_WINDOW_HOURS = 87_600  # ten years
DEFAULT_FEATURE_ROWS = 100_000
MAX_FEATURE_ROWS = 1_000_000


def _utc_now() -> datetime:
    # Naive UTC, like every timestamp the database stores.
    return datetime.now(UTC).replace(tzinfo=None)


async def get_stats(request: web.Request) -> web.Response:
    """Count, mean, spread and quantiles of each field's numbers in the newest records."""
    stream = stream_name(request)
    query = request.query
    refuse_unknown_parameters(query, ("field", "window_hours", "max_records"))
    fields = parse_fields(query)
    window_hours = parse_positive(
        query, "window_hours", default=STATS_WINDOW_HOURS, maximum=MAX_STATS_WINDOW_HOURS
    )
    max_records = parse_positive(
        query, "max_records", default=DEFAULT_MAX_RECORDS, maximum=MAX_MAX_RECORDS
    )
    paths = [json_path(field) for field in fields]
    computed_at = _utc_now()
    since = computed_at - timedelta(hours=window_hours)
    stats = await database(request).read(
        lambda cursor: field_stats(cursor, stream, paths, since, max_records)
    )
    return web.json_response(
        {
            "stream": stream,
            "window_hours": window_hours,
            "max_records": max_records,
            "computed_at": json_value(computed_at),
            "fields": dict(zip(fields, stats, strict=True)),
        }
    )


async def get_features(request: web.Request) -> web.Response:
    """Newest-first rows of floats, one per accepted record where every field is a number."""
    stream = stream_name(request)
    query = request.query
    refuse_unknown_parameters(query, ("field", "window_hours", "limit"))
    fields = parse_fields(query)
    window_hours = parse_positive(
        query, "window_hours", default=FEATURES_WINDOW_HOURS, maximum=MAX_FEATURES_WINDOW_HOURS
    )
    limit = parse_positive(query, "limit", default=DEFAULT_FEATURE_ROWS, maximum=MAX_FEATURE_ROWS)
    paths = [json_path(field) for field in fields]
    since = _utc_now() - timedelta(hours=window_hours)
    rows = await database(request).read(
        lambda cursor: feature_rows(cursor, stream, paths, since, limit)
    )
    # The rows arrive as JSON text from DuckDB: re-encoding up to a million of them here
    # would block the event loop for seconds. Only the small head is encoded by Python.
    head = json.dumps({"stream": stream, "fields": fields})
    body = f'{head[:-1]}, "rows": {rows.json}, "count": {rows.count}}}'
    return web.Response(text=body, content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the statistics and features routes."""
    app.router.add_get(STATS_PATH, get_stats, allow_head=False)
    app.router.add_get(FEATURES_PATH, get_features, allow_head=False)
