"""Path tricks sent as raw bytes: each is resolved to the path the upstream will serve (and the
policy decides on that path) or refused with request.bad_path, with one audit event."""

from __future__ import annotations

import json

import pytest
from support.stack import Stack

from gateway.testing import raw_request

# (id, role, method, raw target, expected status, expected reason_id or None, audited path)
TRICKS = [
    ("double_slashes_resolve", "reader", "GET", "//api//tickets", 200, None, "/api/tickets"),
    ("dot_segments_resolve", "reader", "GET", "/api/./tickets/.", 200, None, "/api/tickets"),
    (
        "dotdot_inside_root_resolves",
        "reader",
        "GET",
        "/api/x/../tickets",
        200,
        None,
        "/api/tickets",
    ),
    (
        "dotdot_to_unrouted_admin",
        "reader",
        "GET",
        "/api/x/../admin",
        404,
        "route.not_found",
        "/api/admin",
    ),
    (
        "encoded_dotdot_to_admin",
        "reader",
        "GET",
        "/api/x/%2e%2e/admin",
        404,
        "route.not_found",
        "/api/admin",
    ),
    (
        "encoded_dotdot_climbs_root",
        "reader",
        "GET",
        "/api/%2e%2e/%2e%2e/etc/passwd",
        400,
        "request.bad_path",
        None,
    ),
    (
        "plain_dotdot_climbs_root",
        "reader",
        "GET",
        "/../../etc/passwd",
        400,
        "request.bad_path",
        None,
    ),
    ("encoded_slash", "reader", "GET", "/api/tickets%2F1", 400, "request.bad_path", None),
    (
        "encoded_slash_lowercase",
        "reader",
        "GET",
        "/api/tickets/1%2f..%2f..%2fadmin",
        400,
        "request.bad_path",
        None,
    ),
    ("encoded_backslash", "reader", "GET", "/api/tickets%5c1", 400, "request.bad_path", None),
    ("raw_backslash", "reader", "GET", "/api\\tickets", 400, "request.bad_path", None),
    (
        "double_encoded_dots",
        "reader",
        "GET",
        "/api/tickets/%252e%252e/admin",
        400,
        "request.bad_path",
        None,
    ),
    ("encoded_nul", "reader", "GET", "/api/tickets/1%00", 400, "request.bad_path", None),
    ("bad_percent_encoding", "reader", "GET", "/api/tickets/%zz", 400, "request.bad_path", None),
    ("overlong_utf8", "reader", "GET", "/api/%c0%ae%c0%ae/admin", 400, "request.bad_path", None),
    ("asterisk_form", "reader", "OPTIONS", "*", 400, "request.bad_path", None),
    (
        "absolute_form",
        "reader",
        "GET",
        "https://localhost/api/tickets",
        400,
        "request.bad_path",
        None,
    ),
    (
        "bad_query_encoding",
        "reader",
        "GET",
        "/api/tickets?status=%zz",
        400,
        "request.bad_query",
        None,
    ),
    # The policy decides on the resolved path: these land on routes the role may not use.
    (
        "reader_delete_via_dotdot",
        "reader",
        "DELETE",
        "/api/departments/1/../../tickets/1",
        403,
        "authz.denied",
        "/api/tickets/1",
    ),
    (
        "ingest_reads_employees_via_dotdot",
        "ingest_process",
        "GET",
        "/api/ingest/s/../../employees",
        403,
        "authz.denied",
        "/api/employees",
    ),
    (
        "ingest_reads_employees_via_encoded_dots",
        "ingest_process",
        "GET",
        "/api/ingest/%2E%2E/employees",
        403,
        "authz.denied",
        "/api/employees",
    ),
    (
        "reader_posts_ticket_via_dot",
        "reader",
        "POST",
        "/api/./tickets/",
        403,
        "authz.denied",
        "/api/tickets",
    ),
]


@pytest.mark.parametrize(
    ("role", "method", "target", "status", "reason_id", "audited_path"),
    [row[1:] for row in TRICKS],
    ids=[row[0] for row in TRICKS],
)
async def test_path_trick(stack: Stack, role, method, target, status, reason_id, audited_path):
    """The path is resolved or refused before any decision; the audit records what was decided on."""
    token = stack.mint("trickster", (role,))
    headers = {"Authorization": f"Bearer {token}"}
    body = b""
    if method == "POST":
        body = b'{"title": "x"}'
        headers["Content-Type"] = "application/json"
    got, response_headers, payload = await raw_request(
        stack.https_port, f"{method} {target} HTTP/1.1", headers, body=body, ssl=stack.ssl_context()
    )
    assert got == status, payload
    request_id = response_headers["x-request-id"]
    (event,) = stack.audit_for(request_id)
    assert event["reason_id"] == reason_id
    if reason_id is not None:
        assert json.loads(payload)["reason_id"] == reason_id
    if audited_path is not None:
        assert event["path"] == audited_path
