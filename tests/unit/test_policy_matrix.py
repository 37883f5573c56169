"""The allow/deny matrix: every role on every route, checked both ways; a gap fails the run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from support.stack import REPO

from gateway.pipeline import Principal, RequestContext
from gateway.policy import PolicyError
from gateway.policy.embedded import EmbeddedPolicyEngine, PolicySources
from gateway.policy.testing import check_matrix, defined_roles, load_matrix
from gateway.routes import load_routes
from gateway.stages.authz import policy_input
from gateway.stages.normalize import normalise_path, parse_query

ENTRYPOINT = "gateway/authz/decision"
SCHEMAS = REPO / "config" / "schemas"


@pytest.fixture(scope="module")
def routes():
    return load_routes(REPO / "config" / "routes.toml", SCHEMAS)


@pytest.fixture
def policies(tmp_path):
    """A copy of the shipped policy directory, matrix included, to edit."""
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


def check(directory, routes):
    """The matrix's problems and wrong cells for a policy directory."""
    sources = PolicySources.read(directory)
    matrix = load_matrix(directory / "matrix.toml", routes, defined_roles(sources))
    wrong = check_matrix(EmbeddedPolicyEngine(sources, ENTRYPOINT), matrix.cells)
    return matrix, wrong


def set_cell(directory, table, key, value):
    """Rewrite one plain cell of the matrix file."""
    matrix = directory / "matrix.toml"
    text = matrix.read_text()
    section = text.index(f"[{table}]\n")
    pattern = re.compile(rf'^"{re.escape(key)}"\s*=\s*"\w+"$', re.MULTILINE)
    found = pattern.search(text, section)
    assert found is not None, f"{table} {key} not in the matrix"
    line = f'"{key}" = "{value}"' if value is not None else ""
    matrix.write_text(text[: found.start()] + line + text[found.end() :])


def run_policy_test(*args):
    return subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "test", *args],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_shipped_policy_passes_tests_matrix_and_coverage():
    """`gateway policy test` on the shipped policy exits 0 with every matrix cell checked."""
    result = run_policy_test()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    checked = re.search(r"matrix: (\d+) cells checked, 0 wrong, 0 missing or stale", result.stdout)
    assert checked is not None, result.stdout
    roles = defined_roles(PolicySources.read(REPO / "policies"))
    routes = load_routes(REPO / "config" / "routes.toml", SCHEMAS)
    methods = sum(len(route.methods) for route in routes.routes)
    assert int(checked.group(1)) >= (len(roles) + 1) * methods


def test_flipped_cell_fails_the_command_naming_the_cell(policies):
    """A reader cell flipped to allow a delete makes the command exit 1 and name the cell."""
    set_cell(policies, "roles.reader", "DELETE tickets.delete", "allow")
    result = run_policy_test("--dir", str(policies))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        'FAIL matrix [roles.reader] "DELETE tickets.delete": expected allow, '
        "got deny ['rbac.action_not_granted']" in result.stdout
    )


@pytest.mark.parametrize(
    ("table", "key", "flipped", "expected"),
    [
        ("roles.reader", "GET tickets.get", "deny", "expected deny, got allow"),
        ("roles.support_agent", "PATCH tickets.update", "deny", "expected deny, got allow"),
        ("roles.support_agent", "DELETE tickets.delete", "allow", "expected allow, got deny"),
        ("roles.ingest_process", "GET ingest.read", "deny", "expected deny, got allow"),
        ("no_role", "GET tickets.list", "allow", "expected allow, got deny"),
    ],
    ids=["allow_to_deny", "agent_update", "agent_delete", "ingest_read", "no_role"],
)
def test_a_cell_disagreeing_either_way_is_reported(policies, routes, table, key, flipped, expected):
    """Each cell is checked in both directions: a wrong allow and a wrong deny both fail."""
    set_cell(policies, table, key, flipped)
    matrix, wrong = check(policies, routes)
    assert matrix.problems == []
    assert len(wrong) == 1
    assert wrong[0].startswith(f'[{table}] "{key}": {expected}')


def test_attribute_case_disagreeing_is_reported_with_its_note(policies, routes):
    """A manager's case expecting another department's employees names the case and its note."""
    matrix_file = policies / "matrix.toml"
    text = matrix_file.read_text()
    old = '{ expect = "deny", query = { department_id = ["4"] }, note = "another department" }'
    assert old in text
    matrix_file.write_text(text.replace(old, old.replace('"deny"', '"allow"')))
    _, wrong = check(policies, routes)
    case = '[roles.manager] "GET employees.list" case 4 (another department)'
    assert wrong == [f"{case}: expected allow, got deny ['rbac.not_own_department']"]


def test_route_removed_from_the_matrix_fails(policies, routes):
    """A deliberately untested cell (a route missing from one role's table) is a failure."""
    set_cell(policies, "roles.admin", "GET ingest.read", None)
    matrix, wrong = check(policies, routes)
    assert wrong == []
    assert matrix.problems == ['[roles.admin] "GET ingest.read": no cell for this route and method']


def test_new_role_without_matrix_rows_fails(policies, routes):
    """A role added to data.json is unchecked until the matrix has its table: that fails."""
    data_file = policies / "data.json"
    data = json.loads(data_file.read_text())
    data["rbac"]["roles"]["auditor"] = {"permissions": {"tickets": ["read"]}}
    data_file.write_text(json.dumps(data))
    matrix, _ = check(policies, routes)
    cells = sum(len(route.methods) for route in routes.routes)
    assert matrix.problems == [
        f"[roles.auditor]: no such table, so none of its {cells} cells is checked"
    ]


def test_new_role_without_matrix_rows_fails_the_command(policies):
    """The same gap through the command: exit 1 and a FAIL line naming the role."""
    data_file = policies / "data.json"
    data = json.loads(data_file.read_text())
    data["rbac"]["roles"]["auditor"] = {"permissions": {"tickets": ["read"]}}
    data_file.write_text(json.dumps(data))
    result = run_policy_test("--dir", str(policies))
    assert result.returncode == 1
    assert "FAIL matrix [roles.auditor]: no such table" in result.stdout


def test_new_route_without_cells_fails_for_every_role(policies, tmp_path, routes):
    """A route added to the route table needs a cell in every role's table and in no_role."""
    table = tmp_path / "routes.toml"
    table.write_text(
        (REPO / "config" / "routes.toml").read_text()
        + '\n[[route]]\nname = "audit.list"\nmethods = ["GET"]\npath = "/api/audit"\n'
        'resource = "audit"\naction = "read"\n'
    )
    sources = PolicySources.read(policies)
    roles = defined_roles(sources)
    matrix = load_matrix(policies / "matrix.toml", load_routes(table, SCHEMAS), roles)
    expected = [
        f'[roles.{role}] "GET audit.list": no cell for this route and method' for role in roles
    ]
    assert matrix.problems == [
        *expected,
        '[no_role] "GET audit.list": no cell for this route and method',
    ]


def test_cells_for_unknown_roles_and_routes_are_stale(policies, routes):
    """A table for a role data.json no longer has, or a key for no route, fails as stale."""
    matrix_file = policies / "matrix.toml"
    matrix_file.write_text(
        matrix_file.read_text() + '\n[roles.ghost]\n"GET tickets.list" = "deny"\n'
    )
    set_cell(policies, "roles.reader", "GET tickets.list", None)
    text = matrix_file.read_text().replace(
        "[roles.reader]\n",
        '[roles.reader]\n"GET tickets.lst" = "allow"\n"GET tickets.list" = "allow"\n',
    )
    matrix_file.write_text(text)
    matrix, _ = check(policies, routes)
    assert matrix.problems == [
        '[roles.reader] "GET tickets.lst": no such method and route in the route table',
        "[roles.ghost]: no role 'ghost' in data.rbac.roles",
    ]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '"GET tickets.get"           = "allow"',
            '"GET tickets.get" = "maybe"',
            'expect must be "allow" or "deny"',
        ),
        ("[params]\n", "[bogus]\n", "unknown key 'bogus'"),
        ('stream = "sensors"', 'stream = "Not A Stream"', "does not match route ingest"),
        ('stream = "sensors"', "", "[params] has no value for 'stream'"),
        (
            "claims = { department_id = 3 }",
            'claims = { groups = ["x"] }',
            "never gives the policy the claim 'groups'",
        ),
        ('note = "another department" }', 'why = "x" }', "unknown key 'why'"),
    ],
    ids=[
        "bad_expect",
        "unknown_table",
        "param_not_matching",
        "param_missing",
        "claim_not_passed",
        "unknown_case_key",
    ],
)
def test_malformed_matrix_is_refused_naming_the_place(policies, routes, old, new, message):
    """A mistake in the matrix file stops the check with a message naming where it is."""
    matrix_file = policies / "matrix.toml"
    text = matrix_file.read_text()
    assert old in text
    matrix_file.write_text(text.replace(old, new, 1))
    with pytest.raises(PolicyError, match=re.escape(message)):
        check(policies, routes)


def test_missing_matrix_file_is_refused(policies, routes):
    """A policy directory without a matrix file cannot pass: nothing would be checked."""
    (policies / "matrix.toml").unlink()
    with pytest.raises(PolicyError, match="matrix file not found"):
        check(policies, routes)


def test_cell_document_is_the_gateways_own_input(routes):
    """A cell's input document is what policy_input builds for the same request and subject."""
    matrix = load_matrix(
        REPO / "policies" / "matrix.toml",
        routes,
        defined_roles(PolicySources.read(REPO / "policies")),
    )
    cell = next(
        c
        for c in matrix.cells
        if c.label
        == '[roles.manager] "GET employees.list" case 2 (filtered to the claim\'s department)'
    )
    peer = mock.Mock()
    peer.get_extra_info.return_value = ("127.0.0.1", 50000)
    request = make_mocked_request("GET", "/api/employees?department_id=3", transport=peer)
    ctx = RequestContext.start(request)
    ctx.path, ctx.segments = normalise_path("/api/employees")
    ctx.query = parse_query("department_id=3")
    found, _ = routes.match("GET", ctx.path)
    ctx.route, ctx.params = found.route, found.params
    claims = {"department_id": 3, "exp": int(time.time()) + 60}
    ctx.principal = Principal(
        "matrix-user", ("manager",), "https://localhost:8443", claims, ("pwd",)
    )
    built = policy_input(ctx)
    built["time"] = cell.document["time"]
    assert cell.document == built
    assert cell.expect_allow is True
