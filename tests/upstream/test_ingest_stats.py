"""Stream statistics and feature rows: accepted JSON numbers only, within a window."""

import json
import statistics

import pytest
from support.envelopes import accepted, envelope, post_envelope, quarantined, sql

JSON = {"Content-Type": "application/json"}
STAT_NAMES = ["count", "mean", "stddev", "min", "max", "median", "mad", "q1", "q3"]


async def ingest(api, stream: str, records: list[dict]) -> dict:
    return await api.json(
        "POST", f"/api/ingest/{stream}", 201, data=json.dumps(records).encode(), headers=JSON
    )


async def age_records(api, stream: str, hours: int) -> None:
    """Move every stored record of a stream ``hours`` into the past."""
    await sql(
        api,
        "UPDATE ingest_records SET received_at = received_at - to_hours(CAST(? AS BIGINT))"
        " WHERE stream = ?",
        [hours, stream],
    )


def expected_stats(values: list[float]) -> dict[str, object]:
    """The statistics the service must answer, computed with Python's statistics module."""
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "stddev": statistics.stdev(values),
        "min": min(values),
        "max": max(values),
        "median": median,
        "mad": statistics.median([abs(value - median) for value in values]),
        "q1": q1,
        "q3": q3,
    }


def assert_stats_match(answer: dict, expected: dict) -> None:
    assert answer["count"] == expected["count"]
    for name in STAT_NAMES[1:]:
        assert answer[name] == pytest.approx(expected[name], rel=1e-9), name


async def test_stats_count_only_json_numbers_of_accepted_records(api) -> None:
    """Strings like "12", booleans, nulls, objects and quarantined records are not counted."""
    numbers = [21.5, 19, 23.25, 30, -4.5, 22, 18.75]
    records = [{"temperature": value, "location": {"lat": value / 2}} for value in numbers]
    records += [
        {"temperature": "12"},
        {"temperature": True},
        {"temperature": None},
        {"temperature": {"value": 3}},
        {"temperature": [1, 2]},
        {"humidity": 40},
    ]
    await ingest(api, "sensors", records)
    outliers = [quarantined(0, {"temperature": 1e6}), quarantined(1, {"temperature": -1e6})]
    await post_envelope(api, "sensors", envelope(outliers))
    await ingest(api, "other", [{"temperature": 500}])
    answer = await api.json(
        "GET", "/api/ingest/sensors/stats?field=temperature&field=location.lat", 200
    )
    assert answer["stream"] == "sensors"
    assert (answer["window_hours"], answer["max_records"]) == (24, 50_000)
    assert answer["computed_at"].endswith("Z")
    assert list(answer["fields"]) == ["temperature", "location.lat"]
    assert_stats_match(answer["fields"]["temperature"], expected_stats(numbers))
    halves = [value / 2 for value in numbers]
    assert_stats_match(answer["fields"]["location.lat"], expected_stats(halves))


async def test_stats_of_a_field_without_numbers_are_null(api) -> None:
    """A field never seen as a number answers count 0 and null for every other statistic."""
    await ingest(api, "sensors", [{"temperature": "warm"}, {"other": 1}])
    answer = await api.json("GET", "/api/ingest/sensors/stats?field=temperature", 200)
    assert answer["fields"]["temperature"] == {"count": 0} | dict.fromkeys(STAT_NAMES[1:])


async def test_stats_of_an_unknown_stream_are_null(api) -> None:
    """A stream never written answers empty statistics, not 404."""
    answer = await api.json("GET", "/api/ingest/nothing/stats?field=a", 200)
    assert answer["fields"]["a"]["count"] == 0


async def test_stats_of_one_number_have_no_stddev(api) -> None:
    """The sample standard deviation of a single value is null; the rest is that value."""
    await ingest(api, "sensors", [{"t": 7}])
    stats = (await api.json("GET", "/api/ingest/sensors/stats?field=t", 200))["fields"]["t"]
    assert stats == {
        "count": 1, "mean": 7.0, "stddev": None, "min": 7.0, "max": 7.0,
        "median": 7.0, "mad": 0.0, "q1": 7.0, "q3": 7.0,
    }  # fmt: skip


async def test_stats_honour_the_window(api) -> None:
    """Records older than window_hours are left out; a wider window takes them in."""
    await ingest(api, "sensors", [{"t": 100}, {"t": 200}])
    await age_records(api, "sensors", 48)
    await ingest(api, "sensors", [{"t": 1}, {"t": 2}, {"t": 3}])
    narrow = await api.json("GET", "/api/ingest/sensors/stats?field=t", 200)
    assert_stats_match(narrow["fields"]["t"], expected_stats([1, 2, 3]))
    wide = await api.json("GET", "/api/ingest/sensors/stats?field=t&window_hours=72", 200)
    assert_stats_match(wide["fields"]["t"], expected_stats([1, 2, 3, 100, 200]))
    assert wide["window_hours"] == 72


async def test_stats_honour_max_records_newest_first(api) -> None:
    """max_records keeps the newest records, across batches, whether or not they hold the field."""
    await ingest(api, "sensors", [{"t": 1000}, {"t": 2000}])
    await ingest(api, "sensors", [{"t": 1}, {"other": 0}, {"t": 3}, {"t": 4}])
    answer = await api.json("GET", "/api/ingest/sensors/stats?field=t&max_records=3", 200)
    assert_stats_match(answer["fields"]["t"], expected_stats([3, 4]))
    assert answer["max_records"] == 3


async def test_large_integers_count_as_numbers(api) -> None:
    """Integers beyond signed 64 bits are still JSON numbers."""
    await ingest(api, "sensors", [{"t": 2**64 - 1}, {"t": 1}, {"t": 10**20}])
    answer = await api.json("GET", "/api/ingest/sensors/stats?field=t", 200)
    assert answer["fields"]["t"]["count"] == 3
    assert answer["fields"]["t"]["max"] == pytest.approx(1e20)


_BAD_FIELDS = [
    pytest.param("t';DROP TABLE ingest_records;--", id="quote and statement"),
    pytest.param("t) OR 1=1 --", id="parenthesis and comment"),
    pytest.param("$.t", id="JSON path syntax"),
    pytest.param("/t", id="JSON pointer syntax"),
    pytest.param("t[0]", id="array index"),
    pytest.param("t.*", id="wildcard"),
    pytest.param('t."x"', id="quoted key"),
    pytest.param("t..x", id="empty part"),
    pytest.param(".t", id="leading dot"),
    pytest.param("1t", id="leading digit"),
    pytest.param("t x", id="space"),
    pytest.param("t%0A", id="trailing newline"),
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="part over 64 characters"),
    pytest.param(".".join("a" * 9), id="nine parts"),
    pytest.param("t\u00e9", id="non-ASCII letter"),
]


@pytest.mark.parametrize("endpoint", ["stats", "features"])
@pytest.mark.parametrize("field", _BAD_FIELDS)
async def test_bad_field_names_are_400(api, endpoint: str, field: str) -> None:
    """Field names that are not dotted identifiers never reach SQL."""
    await ingest(api, "sensors", [{"t": 1}])
    answer = await api.json("GET", f"/api/ingest/sensors/{endpoint}?field={field}", 400)
    assert answer["reason_id"] == "upstream.bad_request"
    assert "'field'" in answer["error"]
    assert len((await api.json("GET", "/api/ingest/sensors", 200))["items"]) == 1


@pytest.mark.parametrize(
    ("query", "mentions"),
    [
        pytest.param("", "'field'", id="no field"),
        pytest.param("&".join(f"field=f{n}" for n in range(33)), "'field'", id="33 fields"),
        pytest.param("field=t&field=t", "more than once", id="same field twice"),
        pytest.param("field=t&window_hours=0", "'window_hours'", id="window zero"),
        pytest.param("field=t&window_hours=8761", "'window_hours'", id="window over a year"),
        pytest.param("field=t&window_hours=-1", "'window_hours'", id="negative window"),
        pytest.param("field=t&window_hours=1.5", "'window_hours'", id="fractional window"),
        pytest.param("field=t&window_hours=1&window_hours=2", "more than once", id="window twice"),
        pytest.param("field=t&max_records=0", "'max_records'", id="max_records zero"),
        pytest.param("field=t&max_records=1000001", "'max_records'", id="max_records too large"),
        pytest.param("field=t&limit=5", "unknown query parameter 'limit'", id="unknown parameter"),
    ],
)
async def test_bad_stats_query_is_400(api, query: str, mentions: str) -> None:
    """fields are 1-32 distinct names, window_hours 1-8760, max_records 1-1,000,000."""
    answer = await api.json("GET", f"/api/ingest/sensors/stats?{query}", 400)
    assert mentions in answer["error"]


async def test_stats_accept_32_fields_at_the_limits(api) -> None:
    """32 fields with the largest window and max_records are accepted."""
    fields = "&".join(f"field=f{n}" for n in range(32))
    query = f"{fields}&window_hours=8760&max_records=1000000"
    answer = await api.json("GET", f"/api/ingest/sensors/stats?{query}", 200)
    assert len(answer["fields"]) == 32


async def test_features_are_rows_where_every_field_is_a_number(api) -> None:
    """Rows come newest first, as floats in field order, skipping incomplete records."""
    await ingest(api, "sensors", [{"a": 1, "b": {"c": 2.5}}, {"a": 3, "b": {"c": "4"}}])
    await ingest(api, "sensors", [{"a": 5}, {"a": True, "b": {"c": 1}}, {"a": -6, "b": {"c": 7}}])
    await post_envelope(api, "sensors", envelope([quarantined(0, {"a": 99, "b": {"c": 99}})]))
    await ingest(api, "other", [{"a": 8, "b": {"c": 9}}])
    answer = await api.json("GET", "/api/ingest/sensors/features?field=a&field=b.c", 200)
    assert answer == {
        "stream": "sensors",
        "fields": ["a", "b.c"],
        "rows": [[-6.0, 7.0], [1.0, 2.5]],
        "count": 2,
    }
    assert all(isinstance(value, float) for row in answer["rows"] for value in row)


async def test_features_honour_limit_and_window(api) -> None:
    """limit keeps the newest rows; window_hours leaves older records out."""
    await ingest(api, "sensors", [{"a": 1}])
    await age_records(api, "sensors", 800)
    await ingest(api, "sensors", [{"a": 2}, {"a": 3}, {"a": 4}])
    default = await api.json("GET", "/api/ingest/sensors/features?field=a", 200)
    assert default["rows"] == [[4.0], [3.0], [2.0]]
    limited = await api.json("GET", "/api/ingest/sensors/features?field=a&limit=2", 200)
    assert limited["rows"] == [[4.0], [3.0]]
    wide = await api.json("GET", "/api/ingest/sensors/features?field=a&window_hours=1000", 200)
    assert wide["count"] == 4


async def test_features_of_an_empty_stream_are_no_rows(api) -> None:
    """A stream without matching records answers an empty list, not null."""
    answer = await api.json("GET", "/api/ingest/nothing/features?field=a", 200)
    assert (answer["rows"], answer["count"]) == ([], 0)


async def test_accepted_envelope_records_feed_features(api) -> None:
    """Records the gateway accepted in an envelope count like plain ones."""
    await post_envelope(api, "sensors", envelope([accepted(0, {"a": 1.5})]))
    answer = await api.json("GET", "/api/ingest/sensors/features?field=a", 200)
    assert answer["rows"] == [[1.5]]


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("", id="no field"),
        pytest.param("field=a&limit=0", id="limit zero"),
        pytest.param("field=a&limit=1000001", id="limit too large"),
        pytest.param("field=a&window_hours=87601", id="window over ten years"),
        pytest.param("field=a&max_records=5", id="stats parameter"),
    ],
)
async def test_bad_features_query_is_400(api, query: str) -> None:
    """fields are 1-32 names, limit 1-1,000,000, window_hours 1-87,600, nothing else."""
    await api.json("GET", f"/api/ingest/sensors/features?{query}", 400)


@pytest.mark.parametrize("endpoint", ["stats", "features"])
async def test_bad_stream_name_is_400_on_number_endpoints(api, endpoint: str) -> None:
    """Stream names are checked before anything else."""
    await api.json("GET", f"/api/ingest/Bad.Name/{endpoint}?field=a", 400)


async def test_a_stream_named_stats_is_still_a_stream(api) -> None:
    """/api/ingest/stats reads the stream "stats"; the sub-paths do not shadow it."""
    await ingest(api, "stats", [{"t": 1}])
    answer = await api.json("GET", "/api/ingest/stats", 200)
    assert (answer["stream"], len(answer["items"])) == ("stats", 1)
    numbers = await api.json("GET", "/api/ingest/stats/stats?field=t", 200)
    assert numbers["fields"]["t"]["count"] == 1
