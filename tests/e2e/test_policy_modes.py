"""Enforcement modes, the decision log and "explain why denied", against running gateways."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack

import pytest
from support.identity import copy_policies, start_identity_gateway

from gateway.policy.decisionlog import read_events
from gateway.testing import wait_for_audit_events


async def call(gateway, session, method, path, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, gateway.url(path), headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body, r.headers.get("X-Request-Id")


def audit_of(gateway, request_id):
    return wait_for_audit_events(gateway.audit_file, request_id)


@pytest.fixture(scope="module")
def dry_run_gateway(stack, tmp_path_factory):
    """tickets.delete in dry-run; the decision log erases the address and masks the subject."""
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes, tmp_path_factory.mktemp("dry-run"),
            upstream_port=stack.upstream_port, upstream_secret=stack.secret,
            policy='dry_run_routes = ["tickets.delete"]',
            decision_log='erase = ["/input/request/remote_addr"]\nmask = ["/input/subject/claims"]',
        )  # fmt: skip


async def test_a_dry_run_route_lets_a_deny_through_and_says_would_deny(dry_run_gateway):
    """A reader's DELETE on a dry-run route reaches the upstream; elsewhere it is still 403."""
    gw = dry_run_gateway
    reader = gw.mint("rita", ("reader",))
    async with gw.session() as session:
        status, _, request_id = await call(gw, session, "DELETE", "/api/tickets/999999", reader)
        assert status == 404  # the upstream answered: the gateway did not block
        [event] = audit_of(gw, request_id)
        assert event["decision"] == "allow"
        assert event["detail"]["would_deny"] == ["rbac.action_not_granted"]
        status, body, _ = await call(gw, session, "DELETE", "/api/departments/999999", reader)
        assert (status, body["reason_id"]) == (403, "authz.denied")
        async with session.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as r:
            metrics = await r.text()
    assert 'gateway_policy_would_deny_total{route="tickets.delete"} 1.0' in metrics


async def test_each_decision_is_logged_in_opa_shape_with_fields_erased(dry_run_gateway):
    """decision_id = request id, path, input, result, revision, timing; erased/masked fields."""
    gw = dry_run_gateway
    token = gw.mint("logan", ("reader",))
    async with gw.session() as session:
        status, _, request_id = await call(gw, session, "GET", "/api/tickets", token)
    assert status == 200
    deadline = time.monotonic() + 2
    while True:
        events = [e for e in read_events(gw.root / "decisions.jsonl")
                  if e["decision_id"] == request_id]  # fmt: skip
        if events or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    [event] = events
    assert event["path"] == "gateway/authz/decision"
    assert event["result"] == {"allow": True, "reasons": []}
    assert len(event["bundles"]["gateway"]["revision"]) == 16
    assert event["metrics"]["timer_rego_query_eval_ns"] > 0
    assert event["input"]["subject"]["sub"] == "logan"
    assert event["input"]["route"]["name"] == "tickets.list"
    assert "remote_addr" not in event["input"]["request"]
    assert event["erased"][-1] == "/input/request/remote_addr"
    assert event["input"]["subject"]["claims"] == "**REDACTED**"
    assert event["masked"] == ["/input/subject/claims"]
    assert token not in (gw.root / "decisions.jsonl").read_text()


@pytest.fixture(scope="module")
def policy_dry_run_gateway(stack, tmp_path_factory):
    """A policy that puts its own denials of ticket creation in dry-run (a data flag)."""
    root = tmp_path_factory.mktemp("policy-dry-run")
    policies = copy_policies(root / "policies")
    rego = policies / "gateway" / "authz.rego"
    rego.write_text(
        rego.read_text().replace(
            'decision := {"allow": false, "reasons": _deny_reasons} if not allow',
            'decision := {"allow": false, "reasons": _deny_reasons, "dry_run": _dry_run}'
            " if not allow\n\n"
            "default _dry_run := false\n\n"
            "_dry_run if input.route.name in data.dry_run_routes",
        )
    )
    data = json.loads((policies / "data.json").read_text())
    data["dry_run_routes"] = ["tickets.create"]
    (policies / "data.json").write_text(json.dumps(data))
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes, root / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, policy_dir=policies,
            server='environment = "production"',
        )  # fmt: skip


async def test_the_policy_itself_can_ask_for_dry_run(policy_dry_run_gateway):
    """The security team flips a route to dry-run in data.json, no config or Python change."""
    gw = policy_dry_run_gateway
    reader = gw.mint("rory", ("reader",))
    async with gw.session() as session:
        async with session.post(
            gw.url("/api/tickets"), headers={"Authorization": f"Bearer {reader}"},
            json={"title": "dry", "description": "run", "priority": "low"},
        ) as r:  # fmt: skip
            request_id = r.headers["X-Request-Id"]
            assert r.status != 403
        [event] = audit_of(gw, request_id)
        assert event["detail"]["would_deny"] == ["rbac.action_not_granted"]


async def test_production_keeps_the_reasons_out_of_the_answer(policy_dry_run_gateway):
    """In production a denial says authz.denied only; the reasons stay in the audit trail."""
    gw = policy_dry_run_gateway
    reader = gw.mint("rory", ("reader",))
    async with gw.session() as session:
        status, body, request_id = await call(gw, session, "DELETE", "/api/tickets/1", reader)
    assert (status, body["reason_id"]) == (403, "authz.denied")
    assert "reasons" not in body
    [event] = audit_of(gw, request_id)
    assert event["reasons"] == ["rbac.action_not_granted"]


async def test_development_explains_a_denial_to_the_client(stack, client):
    """In development the client sees the policy's reasons next to the reason id."""
    token = stack.mint("dev", ("reader",))
    async with client.delete(
        stack.url("/api/tickets/1"), headers={"Authorization": f"Bearer {token}"}
    ) as r:
        body = await r.json()
    assert (r.status, body["reason_id"]) == (403, "authz.denied")
    assert body["reasons"] == ["rbac.action_not_granted"]
