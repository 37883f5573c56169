"""The request path end to end: RBAC by the real policy, validation, forwarding to the real
upstream, and exactly one audit event per request with the response's reason id."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest
from support.stack import Stack

from gateway.testing import raw_request


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(client, stack: Stack, method: str, path: str, token: str | None = None, **kwargs):
    headers = {**(bearer(token) if token else {}), **kwargs.pop("headers", {})}
    async with client.request(method, stack.url(path), headers=headers, **kwargs) as r:
        text = await r.text()
        body = await r.json() if r.content_type == "application/json" and text else text
        return r.status, r.headers, body


def one_audit_event(stack: Stack, request_id: str) -> dict:
    events = stack.audit_for(request_id)
    assert len(events) == 1, events
    return events[0]


async def test_reader_lists_tickets(stack, client):
    """A reader may GET tickets: 200 from the upstream, one 'allow' audit event with the revision."""
    status, headers, body = await call(client, stack, "GET", "/api/tickets?limit=5", stack.mint())
    assert status == 200
    assert {"items", "total", "limit", "offset"} <= set(body)
    event = one_audit_event(stack, headers["X-Request-Id"])
    assert (event["decision"], event["reason_id"], event["route"]) == (
        "allow",
        None,
        "tickets.list",
    )
    assert event["policy_revision"]
    assert event["upstream_ms"] is not None


async def test_reader_cannot_create_ticket(stack, client):
    """A reader's POST is refused by the policy (403 authz.denied), reasons kept in the audit."""
    status, _, body = await call(
        client, stack, "POST", "/api/tickets", stack.mint(), json={"title": "x"}
    )
    assert status == 403
    assert body["reason_id"] == "authz.denied"
    event = one_audit_event(stack, body["request_id"])
    assert event["reason_id"] == "authz.denied"
    assert "rbac.action_not_granted" in event["reasons"]


async def test_admin_creates_ticket_with_server_made_id(stack, client):
    """An admin's POST creates a ticket whose id the server chose; the subject is the token's."""
    admin = stack.mint("root", ("admin",))
    status, headers, body = await call(
        client,
        stack,
        "POST",
        "/api/tickets",
        admin,
        json={"title": "printer on fire", "priority": "high"},
    )
    assert status == 201, body
    assert isinstance(body["id"], int)
    assert body["created_by"] == "root"
    assert one_audit_event(stack, headers["X-Request-Id"])["status"] == 201
    status, _, fetched = await call(
        client, stack, "GET", f"/api/tickets/{body['id']}", stack.mint()
    )
    assert (status, fetched["title"]) == (200, "printer on fire")


async def test_concurrent_creates_get_distinct_ids(stack, client):
    """Fifty tickets created at once through the gateway get fifty different ids."""
    admin = stack.mint("root", ("admin",))
    results = await asyncio.gather(
        *(
            call(client, stack, "POST", "/api/tickets", admin, json={"title": f"t{i}"})
            for i in range(50)
        )
    )
    assert [r[0] for r in results] == [201] * 50
    assert len({r[2]["id"] for r in results}) == 50


async def test_spoofed_identity_headers_do_not_reach_the_upstream(stack, client):
    """X-Gateway-* headers from the client are replaced: created_by is the token's subject."""
    admin = stack.mint("root", ("admin",))
    spoof = {
        "X-Gateway-Subject": "mallory",
        "X-Gateway-Roles": "admin",
        "X-Request-Id": "forged",
        "X-Gateway-Secret": "guess",
    }
    status, headers, body = await call(
        client, stack, "POST", "/api/tickets", admin, json={"title": "who am i"}, headers=spoof
    )
    assert status == 201
    assert body["created_by"] == "root"
    assert headers["X-Request-Id"] != "forged"


async def test_ingest_process_pushes_json_and_ndjson_batches(stack, client):
    """The ingest_process role may POST a JSON array or NDJSON to a stream and read it back."""
    ingest = stack.mint("etl-1", ("ingest_process",))
    stream = f"sensors-{uuid.uuid4().hex[:6]}"
    status, _, receipt = await call(
        client,
        stack,
        "POST",
        f"/api/ingest/{stream}",
        ingest,
        json=[{"temp": 21.5}, {"temp": 22.0}],
    )
    assert status == 201, receipt
    assert receipt["accepted"] == 2
    ndjson = b'{"temp": 23.1}\n{"temp": 19.9}\n'
    status, _, receipt = await call(
        client,
        stack,
        "POST",
        f"/api/ingest/{stream}",
        ingest,
        data=ndjson,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 201, receipt
    assert receipt["accepted"] == 2
    # U+2028 inside a string is not a line break for NDJSON (the gateway and upstream agree).
    separator = '{"note": "a\u2028b"}\n'.encode()
    status, _, receipt = await call(
        client,
        stack,
        "POST",
        f"/api/ingest/{stream}",
        ingest,
        data=separator,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert (status, receipt.get("accepted")) == (201, 1), receipt
    status, _, recent = await call(client, stack, "GET", f"/api/ingest/{stream}", ingest)
    assert status == 200
    assert len(recent["items"]) == 5


async def test_reader_cannot_push_to_ingest_stream(stack, client):
    """Reading tickets does not grant writing streams."""
    status, _, body = await call(
        client, stack, "POST", "/api/ingest/sensors", stack.mint(), json=[{"a": 1}]
    )
    assert (status, body["reason_id"]) == (403, "authz.denied")


BAD_PAYLOADS = [
    ("wrong_type", "/api/tickets", {"title": 5}, 422, "validation.schema", "/title"),
    ("missing_required", "/api/tickets", {"priority": "low"}, 422, "validation.schema", "/title"),
    (
        "client_supplied_id",
        "/api/tickets",
        {"title": "x", "id": 99},
        422,
        "validation.schema",
        "/id",
    ),
    (
        "bad_enum",
        "/api/tickets",
        {"title": "x", "status": "lost"},
        422,
        "validation.schema",
        "/status",
    ),
    (
        "bad_email_format",
        "/api/employees",
        {"name": "a", "email": "not-an-email"},
        422,
        "validation.schema",
        "/email",
    ),
    ("ingest_record_not_object", "/api/ingest/s1", [{"a": 1}, 7], 422, "validation.schema", "/1"),
    ("empty_batch", "/api/ingest/s1", [], 422, "validation.schema", ""),
]


@pytest.mark.parametrize(
    ("path", "payload", "status", "reason_id", "pointer"),
    [row[1:] for row in BAD_PAYLOADS],
    ids=[row[0] for row in BAD_PAYLOADS],
)
async def test_invalid_payload_names_the_pointer(
    stack, client, path, payload, status, reason_id, pointer
):
    """A body that fails its schema is refused before the upstream, naming the failing field."""
    admin = stack.mint("root", ("admin",))
    got, _, body = await call(client, stack, "POST", path, admin, json=payload)
    assert (got, body["reason_id"], body["pointer"]) == (status, reason_id, pointer)
    event = one_audit_event(stack, body["request_id"])
    assert event["reason_id"] == reason_id
    assert event["detail"]["pointer"] == pointer
    assert event["upstream_ms"] is None


MALFORMED = [
    ("not_json", b"{title: 1}", "application/json", 400, "validation.malformed_json"),
    ("nan", b'{"title": NaN}', "application/json", 400, "validation.malformed_json"),
    (
        "duplicate_key",
        b'{"title": "a", "title": "b"}',
        "application/json",
        400,
        "validation.malformed_json",
    ),
    ("not_utf8", b'{"title": "\xff"}', "application/json", 400, "validation.malformed_json"),
    (
        "form_encoded",
        b"title=x",
        "application/x-www-form-urlencoded",
        415,
        "validation.content_type",
    ),
    (
        "utf16_body",
        '{"title": "x"}'.encode("utf-16"),
        "application/json",
        400,
        "validation.malformed_json",
    ),
    (
        "utf8_bom",
        b'\xef\xbb\xbf{"title": "x"}',
        "application/json",
        400,
        "validation.malformed_json",
    ),
    (
        "deeply_nested",
        b"[" * 100_000 + b"]" * 100_000,
        "application/json",
        400,
        "validation.malformed_json",
    ),
    (
        "too_large",
        b'{"title": "' + b"x" * 1_100_000 + b'"}',
        "application/json",
        413,
        "request.too_large",
    ),
]


@pytest.mark.parametrize(
    ("data", "content_type", "status", "reason_id"),
    [row[1:] for row in MALFORMED],
    ids=[row[0] for row in MALFORMED],
)
async def test_malformed_body_is_refused(stack, client, data, content_type, status, reason_id):
    """Unparseable, ambiguous, wrongly typed or oversized bodies never reach the upstream."""
    admin = stack.mint("root", ("admin",))
    got, _, body = await call(
        client,
        stack,
        "POST",
        "/api/tickets",
        admin,
        data=data,
        headers={"Content-Type": content_type},
    )
    assert (got, body["reason_id"]) == (status, reason_id)
    assert one_audit_event(stack, body["request_id"])["reason_id"] == reason_id


async def test_header_too_large_for_the_parser_is_json_audited_and_not_echoed(stack):
    """A header beyond the HTTP parser's limit gets the JSON refusal and an audit event, and
    neither the answer nor the gateway's log repeats the header's bytes (it may be a token)."""
    marker = "leaky" + uuid.uuid4().hex
    token = marker + "x" * 40_000
    status, _headers, payload = await raw_request(
        stack.https_port,
        "GET /api/tickets HTTP/1.1",
        {"Authorization": f"Bearer {token}"},
        ssl=stack.ssl_context(),
    )
    assert status == 400
    body = json.loads(payload)
    assert body["reason_id"] == "request.malformed_http"
    assert marker not in payload.decode()
    (event,) = stack.audit_for(body["request_id"])
    assert event["reason_id"] == "request.malformed_http"
    assert marker not in (stack.root / "gateway.log").read_text()


async def test_responses_name_the_product_not_the_framework(stack, client):
    """The Server header does not advertise aiohttp and its version."""
    _, headers, _ = await call(client, stack, "GET", "/api/tickets", stack.mint())
    assert headers["Server"] == "emp-gateway"


async def test_unknown_route_is_404_without_a_policy_decision(stack, client):
    """A path no route names is route.not_found, and the policy was not asked."""
    status, _, body = await call(
        client, stack, "GET", "/api/payroll", stack.mint("root", ("admin",))
    )
    assert (status, body["reason_id"]) == (404, "route.not_found")
    assert one_audit_event(stack, body["request_id"])["policy_revision"] is None


async def test_wrong_method_is_405_with_allow(stack, client):
    """A known path with a method no route takes answers 405 and lists the allowed methods."""
    status, headers, body = await call(
        client, stack, "DELETE", "/api/tickets", stack.mint("root", ("admin",))
    )
    assert (status, body["reason_id"]) == (405, "route.method_not_allowed")
    assert headers["Allow"] == "GET, POST"


async def test_upstream_refuses_callers_without_the_gateway_secret(stack):
    """Straight to the upstream: no secret or a wrong one is 401, the right one passes."""
    base = f"http://127.0.0.1:{stack.upstream_port}/api/tickets"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"X-Gateway-Secret": "wrong"}, {"X-Gateway-Subject": "root"}):
            async with session.get(base, headers=headers) as r:
                assert r.status == 401
                body = await r.json()
                assert body["reason_id"] == "upstream.untrusted_caller"
                assert stack.secret not in await r.text()
        async with session.get(base, headers={"X-Gateway-Secret": stack.secret}) as r:
            assert r.status == 200


async def test_metrics_and_health_on_the_admin_port(stack, client):
    """/metrics counts requests and denials; /healthz is up; /readyz is ready with all checks."""
    await call(client, stack, "GET", "/api/tickets", None)
    # A decision of its own (a role set no other test uses), so the test stands alone.
    await call(client, stack, "GET", "/api/tickets", stack.mint("metrics", ("reader", "admin")))
    admin = f"http://127.0.0.1:{stack.admin_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{admin}/metrics") as r:
            text = await r.text()
        async with session.get(f"{admin}/healthz") as r:
            assert r.status == 200
        async with session.get(f"{admin}/readyz") as r:
            ready = await r.json()
            assert r.status == 200, ready
    assert ready["checks"] == {
        "policy": True, "keys": True, "upstream": True, "audit": True, "identity_state": True
    }  # fmt: skip
    for family in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_authn_failures_total",
        "gateway_denials_total",
        "gateway_policy_eval_seconds_bucket",
    ):
        assert family in text
    assert 'gateway_authn_failures_total{reason_id="authn.missing_token"}' in text
    assert 'gateway_policy_decisions_total{memoised="false"}' in text
