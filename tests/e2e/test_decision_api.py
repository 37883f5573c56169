"""The admin port's OPA Data API on a running gateway, and gateways deciding through a remote OPA.

No OPA binary can be installed here: the "remote OPA" of these tests is the session gateway's
own OPA-compatible endpoint, reached over real loopback HTTP.
"""

from __future__ import annotations

import aiohttp
import pytest

from gateway.policy.remote import RemotePolicyEngine
from gateway.testing import free_port, wait_for_audit_events

DECISION_PATH = "/v1/data/gateway/authz/decision"
# The remote answers over loopback in about a millisecond; generous bounds keep a busy CI green.
REMOTE_SETTINGS = "opa_timeout_ms = 2000.0\neval_budget_ms = 2000.0"
DENY_ALL_REGO = """package gateway.authz

import rego.v1

decision := {"allow": false, "reasons": ["local.deny_all"]}
"""


def admin_url(gateway, path: str) -> str:
    return f"http://127.0.0.1:{gateway.admin_port}{path}"


def decision_input(roles, resource, action, method="GET", path="/api/tickets"):
    return {
        "subject": {"sub": "alice", "roles": roles, "amr": ["pwd"], "claims": {}},
        "request": {"method": method, "path": path, "segments": path.strip("/").split("/")},
        "route": {"name": f"{resource}.{action}", "resource": resource, "action": action},
        "time": {"now": "2026-11-22T20:00:00Z"},
    }


async def post_json(session, url, payload):
    async with session.post(url, json=payload) as response:
        return response.status, await response.json()


async def api_call(gateway, session, method, path, token):
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, gateway.url(path), headers=headers) as response:
        return response.status, await response.json()


def audit_of(gateway, request_id):
    return wait_for_audit_events(gateway.audit_file, request_id)


@pytest.fixture
async def admin_session():
    async with aiohttp.ClientSession() as session:
        yield session


async def enforced_revision(stack, session) -> str:
    async with session.get(admin_url(stack, "/readyz")) as response:
        return (await response.json())["policy_revision"]


@pytest.mark.parametrize(
    ("roles", "resource", "action", "allowed", "reason"),
    [
        pytest.param(["admin"], "tickets", "delete", True, None, id="admin_deletes_ticket"),
        pytest.param(["reader"], "tickets", "read", True, None, id="reader_reads_tickets"),
        pytest.param(["reader"], "tickets", "delete", False, "rbac.action_not_granted", id="reader_deletes_ticket"),
        pytest.param(["intruder"], "tickets", "read", False, "rbac.no_known_role", id="unknown_role"),
    ],
)  # fmt: skip
async def test_decision_api_answers_the_enforced_decision(
    stack, admin_session, roles, resource, action, allowed, reason
):
    """POST on the admin port's decision path answers the policy's decision and its revision."""
    url = admin_url(stack, DECISION_PATH + "?provenance=true")
    payload = {"input": decision_input(roles, resource, action)}
    status, body = await post_json(admin_session, url, payload)
    assert status == 200, body
    assert body["result"]["allow"] is allowed
    assert (reason in body["result"]["reasons"]) if reason else body["result"]["reasons"] == []
    revision = await enforced_revision(stack, admin_session)
    assert body["provenance"]["bundles"]["gateway"]["revision"] == revision
    assert body["decision_id"]


async def test_decision_api_agrees_with_the_api_path(stack, client, admin_session):
    """The Data API denies what the HTTPS API denies for the same subject and route."""
    reader = stack.mint("rita", ("reader",))
    status, body = await api_call(stack, client, "DELETE", "/api/tickets/1", reader)
    assert (status, body["reason_id"]) == (403, "authz.denied")
    payload = {"input": decision_input(["reader"], "tickets", "delete", "DELETE", "/api/tickets/1")}
    _, answer = await post_json(admin_session, admin_url(stack, DECISION_PATH), payload)
    assert answer["result"]["allow"] is False


async def test_decision_api_serves_role_data_and_rules(stack, admin_session):
    """Other documents answer as OPA would: the role table, and a rule with its default."""
    async with admin_session.get(admin_url(stack, "/v1/data/rbac/roles")) as response:
        roles = (await response.json())["result"]
    assert {"admin", "reader", "ingest_process"} <= set(roles)
    url = admin_url(stack, "/v1/data/gateway/authz/allow")
    _, granted = await post_json(
        admin_session, url, {"input": decision_input(["admin"], "tickets", "read")}
    )
    _, refused = await post_json(
        admin_session, url, {"input": decision_input(["nobody"], "tickets", "read")}
    )
    assert (granted["result"], refused["result"]) == (True, False)


async def test_decision_api_undefined_and_malformed(stack, admin_session):
    """Undefined is 200 without result; bad JSON and a missing input are 400 invalid_parameter."""
    _, undefined = await post_json(
        admin_session, admin_url(stack, "/v1/data/no/such/doc"), {"input": {}}
    )
    assert "result" not in undefined
    async with admin_session.post(admin_url(stack, DECISION_PATH), data=b"{not json") as response:
        assert response.status == 400
        assert (await response.json())["code"] == "invalid_parameter"
    status, body = await post_json(admin_session, admin_url(stack, DECISION_PATH), {"subject": {}})
    assert (status, body["code"]) == (400, "invalid_parameter")


async def test_remote_engine_against_the_running_gateway(stack):
    """RemotePolicyEngine pointed at the gateway's admin port decides, with the gateway's revision."""
    async with RemotePolicyEngine(
        f"http://127.0.0.1:{stack.admin_port}",
        entrypoint="gateway/authz/decision",
        timeout_ms=2000.0,
        pool_size=2,
    ) as remote:
        allowed = await remote.decide_async(decision_input(["admin"], "employees", "delete"))
        denied = await remote.decide_async(decision_input(["reader"], "employees", "delete"))
        assert await remote.reachable() is True
    assert (allowed.allow, denied.allow) == (True, False)
    async with aiohttp.ClientSession() as session:
        assert allowed.revision == await enforced_revision(stack, session)


async def test_gateway_in_opa_server_mode_enforces_the_remote_answer(
    make_gateway, stack, tmp_path, admin_session
):
    """policy.engine = "opa-server": the remote's allow and deny are enforced, its revision audited."""
    # The local policy directory denies everything: an allow can only have come from the remote.
    local = tmp_path / "deny-all"
    (local / "gateway").mkdir(parents=True)
    (local / "gateway" / "authz.rego").write_text(DENY_ALL_REGO)
    opa = f"http://127.0.0.1:{stack.admin_port}"
    gateway = make_gateway(
        f"http://127.0.0.1:{free_port()}",  # nothing there: an allowed request ends in 502
        policy_dir=local,
        policy=f'engine = "opa-server"\nopa_url = "{opa}"\n{REMOTE_SETTINGS}',
    )
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=gateway.ssl_context())
    ) as session:
        status, allowed = await api_call(gateway, session, "GET", "/api/tickets", gateway.mint())
        assert (status, allowed["reason_id"]) == (502, "upstream.unavailable")
        status, denied = await api_call(
            gateway, session, "DELETE", "/api/tickets/1", gateway.mint()
        )
        assert (status, denied["reason_id"]) == (403, "authz.denied")
    [event] = audit_of(gateway, allowed["request_id"])
    assert event["policy_revision"] == await enforced_revision(stack, admin_session)


async def test_gateway_in_opa_server_mode_fails_closed_when_opa_is_down(make_gateway, tmp_path):
    """With nothing on OPA's port every request is 403 authz.engine_error and /readyz says no."""
    gateway = make_gateway(
        f"http://127.0.0.1:{free_port()}",
        policy=f'engine = "opa-server"\nopa_url = "http://127.0.0.1:{free_port()}"\n{REMOTE_SETTINGS}',
    )
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=gateway.ssl_context())
    ) as session:
        admin = gateway.mint("root", ("admin",))
        status, body = await api_call(gateway, session, "GET", "/api/tickets", admin)
        assert (status, body["reason_id"]) == (403, "authz.engine_error")
        async with session.get(admin_url(gateway, "/readyz")) as response:
            assert response.status == 503
            assert (await response.json())["checks"]["policy"] is False
