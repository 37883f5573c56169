"""SchemaCheck: jsonschema-rs decides validity, python-jsonschema explains, disagreement fails closed."""

from __future__ import annotations

import jsonschema
import pytest

from gateway.validation.schemas import SchemaCheck

SCHEMA = {
    "type": "object",
    "required": ["t"],
    "additionalProperties": False,
    "properties": {
        "t": {"type": "number", "maximum": 80},
        "email": {"type": "string", "format": "email"},
        "at": {"type": "string", "format": "date-time"},
    },
}


@pytest.fixture(scope="module")
def check() -> SchemaCheck:
    return SchemaCheck(SCHEMA)


def test_a_valid_instance_has_no_errors(check):
    """The fast path: a valid instance is valid, with no explanation needed."""
    assert check.errors({"t": 21.5, "email": "a@b.example", "at": "2026-11-23T10:00:00Z"}) == []


@pytest.mark.parametrize(
    ("instance", "keyword", "path", "message"),
    [
        ({"t": "x"}, "type", ["t"], "'x' is not of type 'number'"),
        ({"t": 81}, "maximum", ["t"], "81 is greater than the maximum of 80"),
        ({}, "required", [], "'t' is a required property"),
        ({"t": 1, "at": "yesterday"}, "format", ["at"], "'yesterday' is not a 'date-time'"),
        ({"t": 10**400}, "maximum", ["t"], "is greater than the maximum of 80"),
    ],
)
def test_failures_are_explained_by_python_jsonschema(check, instance, keyword, path, message):
    """An invalid instance gets python-jsonschema's keyword, path and message."""
    errors = check.errors(instance)
    assert [(e.validator, list(e.absolute_path)) for e in errors] == [(keyword, path)]
    assert message in errors[0].message


def test_a_failure_only_jsonschema_rs_sees_still_fails(check):
    """python-jsonschema's email check only wants an "@"; jsonschema-rs refuses "a@@b": refused."""
    errors = check.errors({"t": 1, "email": "a@@b"})
    assert [(e.validator, list(e.absolute_path)) for e in errors] == [("format", ["email"])]
    assert "email" in errors[0].message
    assert errors[0].instance == "a@@b"


def test_a_schema_that_is_not_a_schema_is_refused():
    """A broken schema is an error at start, not a check that passes everything."""
    with pytest.raises(jsonschema.SchemaError, match=r"12 is not valid under any of the given"):
        SchemaCheck({"type": 12})


def test_iri_formats_are_checked_without_rfc3987_syntax():
    """gateway/__init__ keeps python-jsonschema from importing rfc3987_syntax (2 s): an "iri"
    format is still enforced, by jsonschema-rs, and the failure named."""
    import sys  # noqa: PLC0415 - the state this test is about

    assert sys.modules.get("rfc3987_syntax", None) is None
    iri = SchemaCheck({"type": "string", "format": "iri"})
    assert iri.errors("https://例え.テスト/パス") == []
    errors = iri.errors("not an iri at all")
    assert [e.validator for e in errors] == ["format"]
    assert errors[0].instance == "not an iri at all"
