"""The route table: matching, parameters, and refusal of a bad table."""

from __future__ import annotations

import pytest
from support.stack import REPO

from gateway.config import ConfigError
from gateway.routes import load_routes


@pytest.fixture(scope="module")
def table():
    return load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")


@pytest.mark.parametrize(
    ("method", "path", "name", "params"),
    [
        ("GET", "/api/tickets", "tickets.list", {}),
        ("GET", "/api/tickets/42", "tickets.get", {"id": "42"}),
        ("PATCH", "/api/employees/7", "employees.update", {}),
        ("POST", "/api/ingest/sensor-1", "ingest.write", {"stream": "sensor-1"}),
    ],
    ids=["list", "get", "patch", "ingest"],
)
def test_known_paths_match_their_route(table, method, path, name, params):
    """Each routed path finds its named route and captures its parameters."""
    found, _ = table.match(method, path)
    assert found is not None
    assert found.route.name == name
    assert params.items() <= found.params.items()


@pytest.mark.parametrize(
    "path",
    [
        "/api/tickets/abc",
        "/api/tickets/1/2",
        "/api/ingest/UPPER",
        "/api/ingest/" + "x" * 65,
        "/api",
        "/api/admin",
    ],
)
def test_unrouted_paths_do_not_match(table, path):
    """Parameters are constrained: a non-numeric id or an odd stream name matches nothing."""
    found, allowed = table.match("GET", path)
    assert found is None
    assert not allowed


def test_head_is_not_implied_by_get(table):
    """HEAD is not routed (the upstream does not serve it): 405 listing GET, not a forwarded 405."""
    found, allowed = table.match("HEAD", "/api/tickets/42")
    assert found is None
    assert "GET" in allowed
    assert "HEAD" not in allowed


def test_wrong_method_reports_allowed_methods(table):
    """A path matched under other methods says which ones."""
    found, allowed = table.match("DELETE", "/api/tickets")
    assert found is None
    assert allowed == {"GET", "POST"}


def test_every_write_route_has_a_schema(table):
    """No write route forwards an unvalidated body."""
    for route in table.routes:
        if route.methods & {"POST", "PUT", "PATCH"}:
            assert route.schema is not None or route.record_schema is not None, route.name


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[[route]]\nname = "a"\nmethods = ["GET"]\npath = "/a"\nresource = "a"\n', "action"),
        (
            '[[route]]\nname = "a"\nmethods = ["GET"]\npath = "/a"\nresource = "a"\naction = "r"\nshema = "x"\n',
            "shema",
        ),
        (
            '[[route]]\nname = "a"\nmethods = ["FETCH"]\npath = "/a"\nresource = "a"\naction = "r"\n',
            "methods",
        ),
        (
            '[[route]]\nname = "a"\nmethods = ["POST"]\npath = "/a"\nresource = "a"\naction = "r"\nschema = "no.json"\n',
            "does not exist",
        ),
    ],
    ids=["missing_action", "unknown_key", "bad_method", "missing_schema_file"],
)
def test_bad_route_table_is_refused(tmp_path, text, named):
    """A mistake in routes.toml stops the start and names what is wrong."""
    (tmp_path / "routes.toml").write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_routes(tmp_path / "routes.toml", tmp_path)


def test_every_column_sealed_upstream_is_kept_out_of_the_audit_lines(table):
    """A field the EMP service seals at rest is `sealed` or `sensitive` on every route that
    writes it, so its value never reaches the audit trail's JSON lines or the SIEM."""
    from upstream.sealing import SEALED_COLUMNS  # noqa: PLC0415 - the other process's list

    writes = [r for r in table.routes if r.action in {"create", "update"}]
    for resource, columns in SEALED_COLUMNS.items():
        routes = [r for r in writes if r.resource == resource]
        assert routes, resource
        for route in routes:
            hidden = route.sealed | route.sensitive
            assert set(columns) <= hidden, (route.name, set(columns) - hidden)
