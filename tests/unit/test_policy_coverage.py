"""Rego line coverage: instrumented copies, the lines listed, and the threshold enforced."""

from __future__ import annotations

import subprocess
import sys

import pytest
import regopy
from support.stack import REPO

from gateway.policy.coverage import instrument, measure_coverage
from gateway.policy.embedded import EmbeddedPolicyEngine, PolicySources
from gateway.policy.testing import defined_roles, load_matrix
from gateway.routes import load_routes

ENTRYPOINT = "gateway/authz/decision"

# A small policy and its test: `_weekend` is never referenced, so no test can run it, and the
# second deny reason's last condition never holds in the one test.
TOY_POLICY = """package gateway.authz

import rego.v1

default allow := false

allow if input.subject.sub == "alice"

decision := {"allow": allow, "reasons": _reasons}

_reasons contains "who" if not allow

_reasons contains "never" if {
	not allow
	input.subject.sub == "mallory"
}

_weekend if {
	day := input.time.day
	day in {"sat", "sun"}
}
"""
TOY_TEST = """package gateway.authz_test

import rego.v1

test_allow_alice if {
	data.gateway.authz.allow with input.subject as {"sub": "alice"}
}

test_deny_bob if {
	d := data.gateway.authz.decision with input.subject as {"sub": "bob"}
	d.reasons == {"who"}
}
"""


@pytest.fixture
def toy(tmp_path):
    """A policy directory with an untested rule."""
    directory = tmp_path / "toy"
    (directory / "gateway").mkdir(parents=True)
    (directory / "gateway" / "authz.rego").write_text(TOY_POLICY)
    (directory / "gateway" / "authz_test.rego").write_text(TOY_TEST)
    return directory


def test_untested_rule_lowers_coverage_and_is_listed(toy):
    """A rule no test reaches is reported line by line, and coverage is below 100%."""
    report = measure_coverage(PolicySources.read(toy), [], ENTRYPOINT)
    (module,) = report.modules
    assert module.module == "gateway/authz.rego"
    assert report.percent < 100
    # 18-20: _weekend's head and body; 15: the "never" reason's condition that never held.
    assert module.uncovered == (15, 18, 19, 20)
    assert set(module.covered) == {7, 11, 13, 14}


def test_matrix_documents_count_towards_coverage(toy):
    """Lines run only by a matrix cell's input are covered as well as those run by tests."""
    mallory = {"subject": {"sub": "mallory"}, "time": {"day": "sat"}}
    report = measure_coverage(PolicySources.read(toy), [mallory], ENTRYPOINT)
    assert 15 in report.modules[0].covered
    assert report.modules[0].uncovered == (18, 19, 20)  # still never referenced


def test_threshold_is_enforced_by_the_command(toy):
    """`gateway policy test` exits 1 below --min-coverage and names the lines, 0 at or above."""
    # The toy has no matrix file of its own: lend it one with a route table of no cells.
    routes = toy.parent / "routes.toml"
    routes.write_text('[[route]]\nname = "x.get"\nmethods = ["GET"]\npath = "/x"\n')
    routes.write_text(routes.read_text() + 'resource = "x"\naction = "read"\n')
    (toy / "matrix.toml").write_text('[no_role]\n"GET x.get" = "deny"\n')
    command = [sys.executable, "-m", "gateway", "policy", "test", "--dir", str(toy)]
    command += ["--routes", str(routes)]
    below = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    assert below.returncode == 1, below.stdout + below.stderr
    assert (
        "coverage gateway/authz.rego: 4/8 lines (50.0%); not covered: 15, 18, 19, 20"
        in below.stdout
    )
    assert "FAIL coverage: 50.0% of lines, minimum 90%" in below.stdout
    lowered = subprocess.run(
        [*command, "--min-coverage", "50"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert lowered.returncode == 0, lowered.stdout + lowered.stderr


def test_shipped_policy_is_at_least_90_percent_covered():
    """The shipped tests and matrix run at least 90% of the shipped policy's lines."""
    sources = PolicySources.read(REPO / "policies")
    routes = load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")
    matrix = load_matrix(REPO / "policies" / "matrix.toml", routes, defined_roles(sources))
    report = measure_coverage(sources, [c.document for c in matrix.cells], ENTRYPOINT)
    assert report.percent >= 90, report.summary()


def test_instrumented_policy_decides_as_the_original(capfd):
    """The markers change no decision: the instrumented copy answers every matrix cell alike."""
    sources = PolicySources.read(REPO / "policies")
    routes = load_routes(REPO / "config" / "routes.toml", REPO / "config" / "schemas")
    matrix = load_matrix(REPO / "policies" / "matrix.toml", routes, defined_roles(sources))
    modules = {name: instrument(name, text).text for name, text in sources.modules.items()}
    copy = PolicySources(modules, sources.tests, sources.data, sources.revision)
    original = EmbeddedPolicyEngine(sources, ENTRYPOINT)
    instrumented = EmbeddedPolicyEngine(copy, ENTRYPOINT)
    for cell in matrix.cells:
        expected = original.evaluate(cell.document)
        assert instrumented.evaluate(cell.document).reasons == expected.reasons, cell.label
        assert instrumented.evaluate(cell.document).allow == expected.allow, cell.label
    assert "__cov__" in capfd.readouterr().out  # the prints ran, on the C-level stdout


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        ("p if {\n\ta == 1\n\tb == 2\n}\n", {1, 2, 3}),
        ("p if input.a == 1\n", {1}),
        ('p if {\n\tx := {\n\t\t"a": 1,\n\t}\n\tx.a == 1\n}\n', {1, 2, 5}),
        ("p if {\n\tq with input.a as 1\n\t\twith input.b as 2\n}\n", {1, 2}),
        ("p if {\n\tevery v in [1] {\n\t\tv > 0\n\t}\n}\n", {1, 2}),
        ('p := "}" if {\n\ts := "{ # not a brace"\n} else := "x" if {\n\ttrue\n}\n', {1, 2, 3, 4}),
        ("# p if {\ndefault p := false\n\nq := 1\n\nr if { true }\n", set()),
    ],
    ids=["body", "one_line", "multi_line_value", "with_lines", "every", "strings_and_else", "none"],
)
def test_instrumenter_counts_heads_and_top_level_expressions(source, lines):
    """Heads and whole top-level body expressions are coverable; constants and comments are not."""
    result = instrument("m.rego", f"package m\n\nimport rego.v1\n\n{source}")
    assert {n - 4 for n in result.lines} == lines
    interpreter = regopy.Interpreter()
    interpreter.add_module("m.rego", result.text)  # still a valid module
