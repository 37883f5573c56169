"""The embedded engine: decisions of the real policy, the shape check, and the Rego test runner."""

from __future__ import annotations

import shutil

import pytest
import regopy
from support.stack import REPO

from gateway.policy import PolicyError, check_decision
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.policy.regoinput import to_rego_input
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


ECHO_POLICY = "package gateway.authz\nimport rego.v1\ndecision := input\n"


def test_lean_input_conversion_matches_regopys_own():
    """The gateway's input conversion gives the policy exactly what regopy's set_input would."""
    interpreter = regopy.Interpreter()
    interpreter.add_module("echo.rego", ECHO_POLICY)
    bundle = interpreter.build(None, ["gateway/authz/decision"])
    document = {
        "subject": {
            "sub": "alice",
            "roles": ["reader", "é✓"],
            "amr": [],
            "claims": {"aud": ["a", "b"]},
        },
        "request": {"query": {"limit": ["10", "20"]}, "segments": ("api", "tickets")},
        "numbers": [0, -1, 2**40, 1.5, -0.25],
        "flags": [True, False, None],
        "empty": {},
    }
    answers = []
    for converted in (document, to_rego_input(document)):
        interpreter.set_input(converted)
        answers.append(str(interpreter.query_bundle_entrypoint(bundle, "gateway/authz/decision")))
    assert answers[0] == answers[1]
    assert '"amr":[]' in answers[1].replace(" ", "")


@pytest.mark.parametrize(
    "bad",
    [
        {"subject": {"roles": ["admin\x00junk"]}},
        {"n": 2**64},
        {1: "x"},
        {"s": {1, 2}},
        {"b": b"x"},
    ],
    ids=["nul_in_role", "int_overflow", "non_string_key", "set", "bytes"],
)
def test_lean_input_conversion_refuses_what_the_policy_must_not_see(bad):
    """A NUL would truncate "admin\\x00junk" to "admin" in C; such inputs are engine errors."""
    with pytest.raises(PolicyError):
        to_rego_input(bad)


def test_nul_in_a_role_is_a_deny_not_an_admin(engine):
    """End to end through the engine: a role smuggling a NUL is refused, never read as admin."""
    with pytest.raises(PolicyError):
        engine.decide(document(["admin\x00junk"], "tickets", "delete"))


def test_memo_answers_a_repeated_input_without_evaluating():
    """The same input twice: the second answer is remembered, identical, and marked so."""
    memo_engine = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT, memo_size=2)
    assert memo_engine.memoised
    first = memo_engine.decide(document(["reader"], "tickets", "read"))
    second = memo_engine.decide(document(["reader"], "tickets", "read"))
    assert (first.allow, first.memoised) == (True, False)
    assert (second.allow, second.memoised, second.revision) == (True, True, first.revision)


def test_memo_never_mixes_inputs_and_stays_bounded():
    """Different subjects, roles or actions get their own decisions; the oldest entry goes first."""
    memo_engine = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT, memo_size=2)
    reader = document(["reader"], "tickets", "create")
    admin = document(["admin"], "tickets", "create")
    assert memo_engine.decide(reader).allow is False
    assert memo_engine.decide(admin).allow is True
    assert memo_engine.decide(reader).memoised is True
    memo_engine.decide(document(["reader"], "tickets", "read"))  # evicts admin (least recent)
    assert memo_engine.decide(admin).memoised is False


def test_policy_using_the_clock_is_never_memoised(tmp_path):
    """A policy calling time.now_ns() (or http.send, rand.intn...) is evaluated every time."""
    shutil.copytree(REPO / "policies", tmp_path / "p")
    extra = tmp_path / "p" / "gateway" / "clock.rego"
    extra.write_text("package gateway.clock\nimport rego.v1\nlate if time.now_ns() > 0\n")
    clock_engine = EmbeddedPolicyEngine.from_directory(tmp_path / "p", ENTRYPOINT, memo_size=16)
    assert clock_engine.memoised is False
    doc = document(["reader"], "tickets", "read")
    assert clock_engine.decide(doc).memoised is False
    assert clock_engine.decide(doc).memoised is False
