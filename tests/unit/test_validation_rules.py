"""Declarative validation rules: each kind on bad records, config errors, and the 422 refusal."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import make_mocked_request
from support.stack import REPO

from gateway.config import ConfigError
from gateway.pipeline import Denial, RequestContext
from gateway.routes import Route, RouteTable, compile_path, load_routes
from gateway.stages.validate import ValidateStage, parse_json
from gateway.validation.rules import RuleSet, Violation, compile_rules

RULES = [
    {"name": "has_id", "kind": "required", "fields": ["id", "location.lat"]},
    {"name": "id_is_int", "kind": "type", "field": "id", "type": "integer"},
    {"name": "flag_is_bool", "kind": "type", "field": "flag", "type": "boolean"},
    {"name": "lat_range", "kind": "range", "field": "location.lat", "min": -90, "max": 90},
    {"name": "level_enum", "kind": "enum", "field": "level", "values": ["low", "high", 3]},
    {"name": "code_pattern", "kind": "pattern", "field": "code", "regex": "[A-Z]{3}-[0-9]+"},
    {"name": "end_after_start", "kind": "compare", "left": "end", "op": ">=", "right": "start"},
    {"name": "max_over_min", "kind": "compare", "left": "hi", "op": ">", "right": "lo"},
]
GOOD = {"id": 1, "location": {"lat": 45.5}}


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return compile_rules("test.route", RULES)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        pytest.param({**GOOD, "extra": "x"}, [], id="good_record_passes"),
        pytest.param({"location": {"lat": 1}}, [("/id", "has_id")], id="required_top_level"),
        pytest.param({"id": 1}, [("/location/lat", "has_id")], id="required_nested"),
        pytest.param({"id": 1, "location": 5}, [("/location/lat", "has_id")], id="parent_not_object"),
        pytest.param({**GOOD, "id": "1"}, [("/id", "id_is_int")], id="type_string_not_int"),
        pytest.param({**GOOD, "id": True}, [("/id", "id_is_int")], id="bool_is_not_integer"),
        pytest.param({**GOOD, "id": 1.5}, [("/id", "id_is_int")], id="float_is_not_integer"),
        pytest.param({**GOOD, "flag": 1}, [("/flag", "flag_is_bool")], id="int_is_not_boolean"),
        pytest.param({"id": 1, "location": {"lat": 91}}, [("/location/lat", "lat_range")], id="range_above_max"),
        pytest.param({"id": 1, "location": {"lat": -90.5}}, [("/location/lat", "lat_range")], id="range_below_min"),
        pytest.param({"id": 1, "location": {"lat": 90}}, [], id="range_is_inclusive"),
        pytest.param({"id": 1, "location": {"lat": True}}, [("/location/lat", "lat_range")], id="range_refuses_bool"),
        pytest.param({"id": 1, "location": {"lat": "45"}}, [("/location/lat", "lat_range")], id="range_refuses_string"),
        pytest.param({**GOOD, "level": "mid"}, [("/level", "level_enum")], id="enum_unknown_value"),
        pytest.param({**GOOD, "level": "3"}, [("/level", "level_enum")], id="enum_string_is_not_number"),
        pytest.param({**GOOD, "level": 3}, [], id="enum_number_member"),
        pytest.param({**GOOD, "code": "ABC-12x"}, [("/code", "code_pattern")], id="pattern_is_full_match"),
        pytest.param({**GOOD, "code": 12}, [("/code", "code_pattern")], id="pattern_refuses_non_string"),
        pytest.param({**GOOD, "code": "ABC-12"}, [], id="pattern_match_passes"),
        pytest.param({**GOOD, "start": "2026-03-02", "end": "2026-03-01"}, [("/end", "end_after_start")], id="date_before_start"),
        pytest.param({**GOOD, "start": "2026-03-01", "end": "2026-03-01"}, [], id="same_date_passes"),
        pytest.param({**GOOD, "start": "2026-03-01T10:00:00+00:00", "end": "2026-03-01T11:00:00+02:00"}, [("/end", "end_after_start")], id="datetime_with_zones"),
        pytest.param({**GOOD, "start": "2026-03-01T10:00:00", "end": "2026-03-01T10:00:00Z"}, [("/end", "end_after_start")], id="naive_vs_aware_refused"),
        pytest.param({**GOOD, "start": "soon", "end": "later"}, [("/end", "end_after_start")], id="non_dates_not_comparable"),
        pytest.param({**GOOD, "lo": 5, "hi": 5}, [("/hi", "max_over_min")], id="compare_numbers_strict"),
        pytest.param({**GOOD, "lo": 5, "hi": 5.5}, [], id="compare_int_and_float"),
        pytest.param({**GOOD, "lo": 5}, [], id="compare_skips_missing_side"),
        pytest.param({**GOOD, "location": {"lat": 1, "lon": 2}}, [], id="optional_fields_missing_skip"),
        pytest.param({"id": "x"}, [("/location/lat", "has_id"), ("/id", "id_is_int")], id="all_violations_in_rule_order"),
    ],
)  # fmt: skip
def test_bad_records_name_rule_and_pointer(rules, record, expected):
    """Each bad record yields exactly the expected (pointer, rule) violations, in rule order."""
    violations = rules.check(record)
    assert [(v.pointer, v.rule) for v in violations] == expected
    assert all(isinstance(v, Violation) and v.message for v in violations)


def test_pointer_escapes_rfc6901():
    """A field name holding '/' or '~' is escaped in the pointer as RFC 6901 asks."""
    ruleset = compile_rules(
        "r", [{"name": "n", "kind": "type", "field": "a/b.c~d", "type": "string"}]
    )
    assert ruleset.check({"a/b": {"c~d": 1}}) == [Violation("/a~1b/c~0d", "n", "expected a string")]


@pytest.mark.parametrize("text", ['{"lat": NaN}', '{"lat": Infinity}', '{"lat": -Infinity}'])
def test_non_finite_numbers_never_reach_rules(text):
    """The strict parser refuses NaN and Infinity, so no range rule ever sees one."""
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_json(text)


@pytest.mark.parametrize("text", ['{"lat": 1e999}', '{"lat": -1E400}', "[1.5e309]"])
def test_overflowing_numbers_are_refused_too(text):
    """A number too large for a float would become Infinity: the parser refuses it."""
    with pytest.raises(ValueError, match="out of range"):
        parse_json(text)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        pytest.param({"name": "x"}, "must be a list", id="not_a_list"),
        pytest.param(["x"], r"rule\[0\]: must be a table", id="not_a_table"),
        pytest.param([{"kind": "type"}], r"rule\[0\]: needs a non-empty string 'name'", id="no_name"),
        pytest.param([{"name": "a", "kind": "shape"}], "rule 'a': unknown kind 'shape'", id="unknown_kind"),
        pytest.param([{"name": "a", "kind": "type", "field": "x"}], "rule 'a': kind 'type' needs key 'type'", id="missing_key"),
        pytest.param([{"name": "a", "kind": "type", "field": "x", "type": "int"}], "type 'int' must be one of", id="unknown_type"),
        pytest.param([{"name": "a", "kind": "enum", "field": "x", "values": [1], "extra": 1}], "unknown key 'extra'", id="unknown_key"),
        pytest.param([{"name": "a", "kind": "required", "fields": ["x"]}, {"name": "a", "kind": "required", "fields": ["y"]}], "rule 'a': duplicate rule name", id="duplicate_name"),
        pytest.param([{"name": "a", "kind": "required", "fields": []}], "non-empty list", id="no_fields"),
        pytest.param([{"name": "a", "kind": "required", "fields": ["x..y"]}], "dotted path", id="empty_path_segment"),
        pytest.param([{"name": "a", "kind": "range", "field": "x"}], "needs 'min', 'max' or both", id="range_without_bounds"),
        pytest.param([{"name": "a", "kind": "range", "field": "x", "min": 5, "max": 1}], "above max", id="range_inverted"),
        pytest.param([{"name": "a", "kind": "range", "field": "x", "min": True}], "finite number", id="range_bool_bound"),
        pytest.param([{"name": "a", "kind": "range", "field": "x", "max": float("inf")}], "finite number", id="range_infinite_bound"),
        pytest.param([{"name": "a", "kind": "enum", "field": "x", "values": []}], "non-empty list", id="enum_empty"),
        pytest.param([{"name": "a", "kind": "pattern", "field": "x", "regex": "("}], "bad regex", id="bad_regex"),
        pytest.param([{"name": "a", "kind": "pattern", "field": "x", "regex": "a" * 201}], "over 200 characters", id="regex_too_long"),
        pytest.param([{"name": "a", "kind": "compare", "left": "x", "op": "=>", "right": "y"}], "op '=>' must be one of", id="bad_op"),
    ],
)  # fmt: skip
def test_bad_config_is_refused_naming_route_and_rule(tables, message):
    """A mistake in the rule tables stops the load with a ConfigError naming route and rule."""
    with pytest.raises(ConfigError, match=re.escape("route 'r.x'")) as caught:
        compile_rules("r.x", tables)
    assert re.search(message, str(caught.value))


def test_route_table_rules_load(tmp_path):
    """routes.toml's `rules` key is compiled at load; a bad rule there is a ConfigError."""
    table = load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")
    ingest = next(r for r in table.routes if r.name == "ingest.write")
    assert ingest.rules is not None
    assert ingest.rules.check({"location": {"lat": 100}})[0].rule == "lat_in_range"
    bad = tmp_path / "routes.toml"
    bad.write_text(
        '[[route]]\nname = "a"\nmethods = ["POST"]\npath = "/a"\nresource = "a"\naction = "c"\n'
        '[[route.rules]]\nname = "n"\nkind = "nope"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="route 'a' rule 'n': unknown kind"):
        load_routes(bad, tmp_path)


def _stage_and_route(*, records: bool) -> tuple[ValidateStage, Route]:
    schema = {"type": "object"}
    route = Route(
        name="r",
        methods=frozenset({"POST"}),
        path="/r",
        resource="r",
        action="create",
        pattern=compile_path("/r"),
        schema=None if records else schema,
        record_schema=schema if records else None,
        content_types=("application/json", "application/x-ndjson"),
        rules=compile_rules("r", RULES),
    )
    return ValidateStage(RouteTable([route]), max_body_bytes=1 << 20), route


async def _run(stage: ValidateStage, route: Route, body: bytes, content_type: str) -> Denial:
    request = make_mocked_request("POST", "/r", headers={"Content-Type": content_type})
    ctx = RequestContext.start(request)
    ctx.route = route
    ctx.body = body
    with pytest.raises(Denial) as caught:
        await stage(ctx)
    return caught.value


async def test_rule_violation_is_a_422_with_pointer_rule_and_message():
    """A JSON body that passes the schema but breaks a rule is refused 422 validation.rule."""
    stage, route = _stage_and_route(records=False)
    denial = await _run(stage, route, b'{"id": true, "location": {"lat": 1}}', "application/json")
    assert (denial.status, denial.reason_id) == (422, "validation.rule")
    assert denial.detail == {
        "pointer": "/id",
        "rule": "id_is_int",
        "message": "expected an integer",
    }
    assert denial.message == "/id: expected an integer"


async def test_ndjson_violation_pointer_carries_the_record_index():
    """For an NDJSON batch, the pointer starts with the failing record's index."""
    stage, route = _stage_and_route(records=True)
    body = b'{"id": 1, "location": {"lat": 1}}\n{"id": 2, "location": {"lat": 95}}\n'
    denial = await _run(stage, route, body, "application/x-ndjson")
    assert denial.reason_id == "validation.rule"
    assert denial.detail["pointer"] == "/1/location/lat"
    assert denial.detail["rule"] == "lat_range"


async def test_schema_error_still_comes_before_rules():
    """Per record, a schema failure stops its checks; a record passing the schema meets the rules."""
    stage, route = _stage_and_route(records=True)
    denial = await _run(stage, route, b'[{"id": "x"}, 7, {"id": 1}]', "application/json")
    assert denial.receipt is not None
    found = [(r["index"], [f["rule"] for f in r["failures"]]) for r in denial.receipt["records"]]
    assert found == [(0, ["has_id", "id_is_int"]), (1, ["record.type"]), (2, ["has_id"])]
    assert (
        denial.receipt["records"][1]["failures"][0]["message"] == "a record must be a JSON object"
    )


async def test_good_body_passes_rules():
    """A body passing schema and rules is parsed into ctx.payload and not refused."""
    stage, route = _stage_and_route(records=False)
    request = make_mocked_request("POST", "/r", headers={"Content-Type": "application/json"})
    ctx = RequestContext.start(request)
    ctx.route = route
    ctx.body = b'{"id": 1, "location": {"lat": 1}}'
    await stage(ctx)
    assert ctx.payload == {"id": 1, "location": {"lat": 1}}
