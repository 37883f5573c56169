"""The decision log's event shape, erasing and masking, and the decision's dry_run field."""

from __future__ import annotations

import pytest

from gateway.pipeline import Decision
from gateway.policy import PolicyError, check_decision
from gateway.policy.decisionlog import MASK, DecisionLog, read_events


def document() -> dict:
    return {
        "subject": {"sub": "alice", "roles": ["reader"], "claims": {"email": "a@example.com"}},
        "request": {
            "method": "GET",
            "path": "/api/tickets",
            "remote_addr": "10.0.0.1",
            "headers": {"content-type": "application/json"},
        },
        "route": {"name": "tickets.list", "params": {"id": "7"}},
    }


DECISION = Decision(allow=False, reasons=("rbac.no_known_role",), revision="abc", eval_us=12.5)


def test_erase_and_mask_change_the_event_not_the_request(tmp_path):
    """Configured fields are erased or masked in the event; the request's own input is intact."""
    log = DecisionLog(
        tmp_path / "d.jsonl", erase=["/input/request/remote_addr", "/input/route/params/id"],
        mask=["/input/subject/claims/email", "/input/not/there"],
    )  # fmt: skip
    original = document()
    log.record(decision_id="r1", document=original, decision=DECISION, wall_time=0.0,
               route="tickets.list", dry_run=False)  # fmt: skip
    log.close()
    [event] = read_events(tmp_path / "d.jsonl")
    assert "remote_addr" not in event["input"]["request"]
    assert event["input"]["route"]["params"] == {}
    assert event["input"]["subject"]["claims"]["email"] == MASK
    assert event["erased"] == ["/input/request/remote_addr", "/input/route/params/id"]
    assert event["masked"] == ["/input/subject/claims/email"]
    assert original == document()  # copy on write: the pipeline's input was not touched
    assert event["result"] == {"allow": False, "reasons": ["rbac.no_known_role"]}
    assert event["metrics"]["timer_rego_query_eval_ns"] == 12500


def test_credential_places_are_always_erased(tmp_path):
    """Should an Authorization header ever enter the input, the log never holds it."""
    log = DecisionLog(tmp_path / "d.jsonl")
    leaky = document()
    leaky["request"]["headers"]["authorization"] = "Bearer secret-token"
    log.record(decision_id="r2", document=leaky, decision=DECISION, wall_time=0.0,
               route="tickets.list", dry_run=True)  # fmt: skip
    log.close()
    text = (tmp_path / "d.jsonl").read_text()
    assert "secret-token" not in text
    assert read_events(tmp_path / "d.jsonl")[0]["dry_run"] is True


def test_a_pointer_that_is_not_a_pointer_stops_the_start(tmp_path):
    """A malformed JSON pointer in the config is refused when the log is built."""
    with pytest.raises(ValueError, match="JSON pointer"):
        DecisionLog(tmp_path / "d.jsonl", erase=["input/request"])


@pytest.mark.parametrize(
    ("result", "dry_run"),
    [({"allow": False, "reasons": []}, False), ({"allow": False, "dry_run": True}, True)],
)
def test_a_decision_may_ask_for_dry_run(result, dry_run):
    """The decision's optional dry_run is read; absent means enforce."""
    assert check_decision(result, "rev", 1.0).dry_run is dry_run


def test_a_dry_run_that_is_not_a_boolean_is_an_engine_error():
    """A malformed dry_run fails closed like any other malformed decision."""
    with pytest.raises(PolicyError, match="dry_run"):
        check_decision({"allow": False, "dry_run": "yes"}, "rev", 1.0)
