"""Checks a policy directory with the embedded engine: its `test_*` rules and its allow/deny matrix.

A test passes only when its rule evaluates to true; undefined, false or an error fails it. A
matrix cell passes only when the engine answers its input document as the cell expects.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import regopy

from gateway.config import read_toml
from gateway.pipeline import Denial
from gateway.policy import PolicyError
from gateway.policy.embedded import (
    EmbeddedPolicyEngine,
    PolicySources,
    new_interpreter,
    read_output,
)
from gateway.stages.authz import POLICY_CLAIMS
from gateway.stages.normalize import normalise_path

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from gateway.routes import Route, RouteTable

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)

MATRIX_FILE = "matrix.toml"  # beside the policy, in policy.dir
NO_ROLE = "no_role"  # the matrix table for a subject whose token carries no role
_MATRIX_KEYS = ("subject", "params", "roles", NO_ROLE)
_CASE_KEYS = ("expect", "claims", "amr", "params", "query", "note")
_EXPECT = {"allow": True, "deny": False}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The same parameter syntax as gateway.routes: {name} or {name:regex}.
_PATH_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)(?::(?:[^{}]|\{[^{}]*\})+)?\}")


@dataclass(frozen=True)
class PolicyTestResult:
    """One Rego test and how it went."""

    module: str
    name: str
    passed: bool
    error: str = ""


def run_policy_tests(directory: Path) -> list[PolicyTestResult]:
    """Evaluate every test rule beside the policy; an empty list means no tests were found."""
    sources = PolicySources.read(directory)
    interpreter = new_interpreter(sources, with_tests=True)
    results: list[PolicyTestResult] = []
    tests: list[tuple[str, str, str]] = []  # module, entrypoint, name
    for module, text in sorted(sources.tests.items()):
        package = _PACKAGE.search(text)
        if package is None:
            results.append(PolicyTestResult(module, "-", passed=False, error="no package line"))
            continue
        prefix = package.group(1).replace(".", "/")
        tests.extend(
            (module, f"{prefix}/{name}", name) for name in dict.fromkeys(_TEST_RULE.findall(text))
        )
    bundle = _test_bundle(interpreter, [entrypoint for _, entrypoint, _ in tests])
    results.extend(_run_one(interpreter, bundle, *test) for test in tests)
    return results


def _test_bundle(interpreter: regopy.Interpreter, entrypoints: list[str]) -> Any:
    """All tests compiled at once, or None when that fails (each test then reports its error).

    Measured here: 38 ad-hoc queries took ~14 s (each compiles every module again); one bundle
    took 0.25 s to build and 0.07 s to query.
    """
    if not entrypoints:
        return None
    try:
        bundle = interpreter.build(None, entrypoints)
    except regopy.RegoError:
        return None
    return bundle if bundle.ok() else None


def _run_one(
    interpreter: regopy.Interpreter, bundle: Any, module: str, entrypoint: str, name: str
) -> PolicyTestResult:
    try:
        if bundle is None:
            output = interpreter.query(f"data.{entrypoint.replace('/', '.')}")
        else:
            output = interpreter.query_bundle_entrypoint(bundle, entrypoint)
        value = read_output(output)
    except (PolicyError, regopy.RegoError) as exc:
        return PolicyTestResult(module, name, passed=False, error=str(exc)[:300])
    return PolicyTestResult(module, name, passed=value is True)


@dataclass(frozen=True)
class MatrixCell:
    """One expectation: this subject on this route and method is allowed, or is not."""

    label: str  # where it is written: `[roles.reader] "GET tickets.list"`, and the case
    expect_allow: bool
    document: dict[str, Any]  # the input document the gateway would build for it


@dataclass(frozen=True)
class Matrix:
    """The cells of a matrix file, and what it leaves untested or names that does not exist."""

    cells: list[MatrixCell] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def defined_roles(sources: PolicySources) -> list[str]:
    """The role names of data.rbac.roles, over every data.json, in the order written."""
    roles: dict[str, None] = {}
    for _, document in sources.data:
        rbac = document.get("rbac") if isinstance(document, dict) else None
        table = rbac.get("roles") if isinstance(rbac, dict) else None
        if isinstance(table, dict):
            roles.update(dict.fromkeys(table))
    return list(roles)


def load_matrix(file: Path, routes: RouteTable, roles: Iterable[str]) -> Matrix:
    """Every cell of the matrix file as an input document; a malformed file raises PolicyError.

    The matrix must hold a cell for each role (and `no_role`) on each method of each route: a
    missing or stale one is a problem, so nothing is left untested by accident.
    """
    raw = read_toml(file, "matrix file", error=PolicyError, hint=" (see docs/policies.md)")
    for key in raw:
        if key not in _MATRIX_KEYS:
            raise PolicyError(f"{file}: unknown key '{key}'; expected {', '.join(_MATRIX_KEYS)}")
    roles = list(roles)
    builder = _MatrixBuilder(file, raw, routes)
    tables = _table(raw.get("roles", {}), f"{file}: [roles]")
    for role in roles:
        builder.add_table(f"[roles.{role}]", [role], tables.get(role))
    for role in tables:
        if role not in roles:
            builder.problem(f"[roles.{role}]: no role '{role}' in data.rbac.roles")
    builder.add_table(f"[{NO_ROLE}]", [], raw.get(NO_ROLE))
    return builder.matrix


class _MatrixBuilder:
    """Turns the matrix's tables into cells, one input document per cell and case."""

    def __init__(self, file: Path, raw: dict[str, Any], routes: RouteTable) -> None:
        self._file = file
        self._subject = _table(raw.get("subject", {}), f"{file}: [subject]")
        self._params = _table(raw.get("params", {}), f"{file}: [params]")
        self._routes = routes
        self._now = datetime.fromtimestamp(int(time.time()), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.matrix = Matrix()

    def problem(self, text: str) -> None:
        """Record a missing or stale entry."""
        self.matrix.problems.append(text)

    def add_table(self, where: str, roles: list[str], table: Any) -> None:
        """The cells of one role's table; every route method must have one."""
        expected = {
            f"{method} {route.name}": (route, method)
            for route in self._routes.routes
            for method in sorted(route.methods)
        }
        if table is None:
            self.problem(f"{where}: no such table, so none of its {len(expected)} cells is checked")
            return
        table = _table(table, f"{self._file}: {where}")
        for key, (route, method) in expected.items():
            if key not in table:
                self.problem(f'{where} "{key}": no cell for this route and method')
                continue
            self._add_cases(f'{where} "{key}"', roles, route, method, table[key])
        for key in table:
            if key not in expected:
                self.problem(f'{where} "{key}": no such method and route in the route table')

    def _add_cases(
        self, where: str, roles: list[str], route: Route, method: str, value: Any
    ) -> None:
        cases = [{"expect": value}] if isinstance(value, str) else value
        if not isinstance(cases, list) or not cases:
            raise PolicyError(f'{self._file}: {where} must be "allow", "deny" or a list of cases')
        for number, case in enumerate(cases, start=1):
            label = where if len(cases) == 1 else f"{where} case {number}"
            case_table = _table(case, f"{self._file}: {label}")
            for key in case_table:
                if key not in _CASE_KEYS:
                    raise PolicyError(
                        f"{self._file}: {label}: unknown key '{key}'; "
                        f"expected {', '.join(_CASE_KEYS)}"
                    )
            expect = case_table.get("expect")
            if expect not in _EXPECT:
                raise PolicyError(f'{self._file}: {label}: expect must be "allow" or "deny"')
            if "note" in case_table:
                label = f"{label} ({case_table['note']})"
            document = self._document(label, roles, route, method, case_table)
            self.matrix.cells.append(MatrixCell(label, _EXPECT[expect], document))

    def _document(
        self, where: str, roles: list[str], route: Route, method: str, case: dict[str, Any]
    ) -> dict[str, Any]:
        """The input gateway.stages.authz.policy_input builds for this request."""
        path, segments, params = self._request_path(where, route, method, case)
        claims = _table(case.get("claims", self._subject.get("claims", {})), where)
        for name in claims:
            if name not in POLICY_CLAIMS:
                raise PolicyError(
                    f"{self._file}: {where}: the gateway never gives the policy the claim "
                    f"'{name}' (POLICY_CLAIMS: {', '.join(POLICY_CLAIMS)})"
                )
        headers = {"content-type": route.content_types[0]} if method in _BODY_METHODS else {}
        return {
            "subject": {
                "sub": self._subject.get("sub", "matrix-user"),
                "roles": roles,
                "iss": self._subject.get("iss"),
                "amr": case.get("amr", self._subject.get("amr", [])),
                "claims": claims,
            },
            "request": {
                "method": method,
                "path": path,
                "segments": segments,
                "query": _table(case.get("query", {}), f"{self._file}: {where}: query"),
                "headers": headers,
                "remote_addr": "127.0.0.1",
            },
            "route": {
                "name": route.name,
                "resource": route.resource,
                "action": route.action,
                "params": params,
            },
            "time": {"now": self._now},
        }

    def _request_path(
        self, where: str, route: Route, method: str, case: dict[str, Any]
    ) -> tuple[str, list[str], dict[str, str]]:
        """A path the route table sends to this route, with the parameters it captures."""
        values = {**self._params, **_table(case.get("params", {}), f"{where}: params")}
        missing = [m.group(1) for m in _PATH_PARAM.finditer(route.path) if m.group(1) not in values]
        if missing:
            raise PolicyError(f"{self._file}: {where}: [params] has no value for '{missing[0]}'")
        raw_path = _PATH_PARAM.sub(lambda m: str(values[m.group(1)]), route.path)
        try:
            path, segments = normalise_path(raw_path)
        except Denial:
            found = None
        else:
            found, _ = self._routes.match(method, path)
        if found is None or found.route.name != route.name:
            raise PolicyError(
                f"{self._file}: {where}: the path {raw_path} built from [params] does not match "
                f"route {route.name}; give a value its pattern accepts"
            )
        return path, list(segments), found.params


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a table")
    return value


def check_matrix(engine: EmbeddedPolicyEngine, cells: Iterable[MatrixCell]) -> list[str]:
    """The cells the engine answers otherwise than expected, each with what it answered."""
    failures: list[str] = []
    for cell in cells:
        expected = "allow" if cell.expect_allow else "deny"
        try:
            decision = engine.evaluate(cell.document)
        except PolicyError as exc:
            failures.append(f"{cell.label}: expected {expected}, the engine failed: {exc}")
            continue
        if decision.allow != cell.expect_allow:
            answer = "allow" if decision.allow else f"deny {list(decision.reasons)}"
            failures.append(f"{cell.label}: expected {expected}, got {answer}")
    return failures
