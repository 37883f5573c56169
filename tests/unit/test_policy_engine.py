"""The embedded engine: decisions of the real policy, the shape check, and the Rego test runner."""

from __future__ import annotations

import shutil

import pytest
from support.stack import REPO

from gateway.policy import PolicyError, check_decision
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.policy.testing import run_policy_tests

ENTRYPOINT = "gateway/authz/decision"


@pytest.fixture(scope="module")
def engine():
    return EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT)


def document(roles, resource, action, sub="alice"):
    return {
        "subject": {"sub": sub, "roles": roles},
        "route": {"resource": resource, "action": action},
    }


@pytest.mark.parametrize(
    ("roles", "resource", "action", "allowed"),
    [
        (["reader"], "tickets", "read", True),
        (["reader"], "tickets", "create", False),
        (["admin"], "employees", "delete", True),
        (["ingest_process"], "ingest", "write", True),
        (["ingest_process"], "tickets", "read", False),
        ([], "tickets", "read", False),
    ],
    ids=[
        "reader_read",
        "reader_create",
        "admin_delete",
        "ingest_write",
        "ingest_tickets",
        "no_roles",
    ],
)
def test_real_policy_decides(engine, roles, resource, action, allowed):
    """The shipped policy allows exactly what data.json grants, and reports the revision."""
    decision = engine.decide(document(roles, resource, action))
    assert decision.allow is allowed
    assert decision.revision == engine.revision
    assert decision.eval_us > 0


def test_decision_for_garbage_input_is_a_deny(engine):
    """Inputs of the wrong shape are denied, not errors and not allows."""
    for junk in (
        {},
        {"subject": "root"},
        {"subject": {"sub": "a", "roles": ["admin"]}, "route": None},
    ):
        assert engine.decide(junk).allow is False


@pytest.mark.parametrize(
    "result",
    [
        None,
        "allow",
        [],
        {"allow": "true"},
        {"allow": 1},
        {"reasons": []},
        {"allow": True, "reasons": "x"},
        {"allow": True, "reasons": [1]},
    ],
    ids=[
        "null",
        "string",
        "list",
        "allow_str",
        "allow_int",
        "no_allow",
        "reasons_str",
        "reasons_int",
    ],
)
def test_decision_shape_is_checked(result):
    """Only {allow: bool, reasons: [str]} is a decision; any other shape is an engine error."""
    with pytest.raises(PolicyError):
        check_decision(result, "rev", 1.0)


def test_revision_changes_with_the_policy(tmp_path, engine):
    """The revision hashes the policy files: an edit gives a new revision."""
    shutil.copytree(REPO / "policies", tmp_path / "p")
    data = tmp_path / "p" / "data.json"
    data.write_text(
        data.read_text().replace('"reader": {', '"auditor": {"permissions": {}},\n"reader": {')
    )
    assert (
        EmbeddedPolicyEngine.from_directory(tmp_path / "p", ENTRYPOINT).revision != engine.revision
    )


def test_shipped_rego_tests_pass():
    """Every test_* rule beside the policy evaluates to true."""
    results = run_policy_tests(REPO / "policies")
    assert len(results) >= 15
    assert [r.name for r in results if not r.passed] == []


def test_rego_test_runner_reports_a_failing_test(tmp_path):
    """A test rule that is false (here: expecting readers to delete) is reported as failed."""
    shutil.copytree(REPO / "policies", tmp_path / "p")
    test_file = tmp_path / "p" / "gateway" / "authz_test.rego"
    test_file.write_text(
        test_file.read_text()
        + """
test_wrongly_expects_reader_to_delete if {
	data.gateway.authz.allow with input.subject as _subject(["reader"])
		with input.route as _route("tickets", "delete")
}
"""
    )
    results = {r.name: r.passed for r in run_policy_tests(tmp_path / "p")}
    assert results["test_wrongly_expects_reader_to_delete"] is False
    assert results["test_allow_reader_reads_tickets"] is True
