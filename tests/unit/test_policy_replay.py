"""`gateway policy replay`: recorded decisions against an edited policy, flips reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.policy.decisionlog import DecisionLog, read_events
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.policy.replay import parse_duration, replay

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = "gateway/authz/decision"


def document(roles: list[str], resource: str, action: str, route: str) -> dict:
    return {
        "subject": {
            "sub": "someone",
            "roles": roles,
            "iss": "https://localhost:8443",
            "amr": ["pwd"],
            "claims": {},
        },
        "request": {
            "method": "GET",
            "path": "/api/x",
            "segments": ["api", "x"],
            "query": {},
            "headers": {},
            "remote_addr": "127.0.0.1",
        },
        "route": {"name": route, "resource": resource, "action": action, "params": {}},
        "time": {"now": "2026-11-22T20:00:00Z"},
    }


CASES = [
    (["reader"], "tickets", "read", "tickets.list"),
    (["reader"], "tickets", "delete", "tickets.delete"),
    (["admin"], "tickets", "delete", "tickets.delete"),
    (["reader"], "departments", "read", "departments.list"),
]


@pytest.fixture
def recorded_log(tmp_path):
    """A decision log of the shipped policy's decisions on CASES (two of them a day old)."""
    engine = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT)
    log = DecisionLog(tmp_path / "decisions.jsonl")
    now = time.time()
    for i, (roles, resource, action, route) in enumerate(CASES * 2):
        doc = document(roles, resource, action, route)
        log.record(decision_id=f"d{i}", document=doc, decision=engine.evaluate(doc),
                   wall_time=now - (86_400 if i >= len(CASES) else 0), route=route,
                   dry_run=False)  # fmt: skip
    log.close()
    return tmp_path / "decisions.jsonl"


def candidate(tmp_path: Path, edit) -> Path:
    target = tmp_path / "candidate"
    shutil.copytree(REPO / "policies", target)
    data = json.loads((target / "data.json").read_text())
    edit(data["rbac"]["roles"])
    (target / "data.json").write_text(json.dumps(data))
    return target


def run_replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "replay", *args],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip


def test_widening_is_reported_by_route_and_roles_and_refused(recorded_log, tmp_path):
    """Giving readers ticket deletion flips those denials; the command exits 1 until accepted."""
    policies = candidate(
        tmp_path, lambda roles: roles["reader"]["permissions"]["tickets"].append("delete")
    )
    result = run_replay("--policies", str(policies), "--log", str(recorded_log))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deny->allow 2" in result.stdout
    assert "DENY -> ALLOW  route=tickets.delete roles=reader  2x  e.g. d1, d5" in result.stdout
    accepted = run_replay("--policies", str(policies), "--log", str(recorded_log),
                          "--accept-widening")  # fmt: skip
    assert accepted.returncode == 0


def test_narrowing_is_reported_and_allowed(recorded_log, tmp_path):
    """Taking ticket reads from readers flips those allows to denies, with the reasons."""
    policies = candidate(
        tmp_path, lambda roles: roles["reader"]["permissions"]["tickets"].remove("read")
    )
    result = run_replay("--policies", str(policies), "--log", str(recorded_log))
    assert result.returncode == 0, result.stderr
    assert "allow->deny 2" in result.stdout
    assert "ALLOW -> DENY  route=tickets.list roles=reader  2x" in result.stdout
    assert "rbac.action_not_granted" in result.stdout


def test_since_keeps_only_recent_decisions(recorded_log, tmp_path):
    """--since 1h replays today's half of the log only."""
    engine = EmbeddedPolicyEngine.from_directory(REPO / "policies", ENTRYPOINT)
    report = replay(read_events(recorded_log), engine, since=parse_duration("1h"))
    assert (report.replayed, report.skipped, report.unchanged) == (4, 4, 4)


def test_an_unchanged_policy_flips_nothing(recorded_log):
    """The shipped policy against its own decisions: every one unchanged."""
    result = run_replay("--policies", str(REPO / "policies"), "--log", str(recorded_log))
    assert result.returncode == 0
    assert "unchanged 8, deny->allow 0, allow->deny 0" in result.stdout


@pytest.mark.parametrize("text", ["24", "1w", "h", "-1h"])
def test_a_bad_duration_is_refused(text):
    """Durations are a number and one of s, m, h, d."""
    with pytest.raises(ValueError, match="--since"):
        parse_duration(text)
