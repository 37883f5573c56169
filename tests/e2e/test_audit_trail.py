"""The audit trail through the gateway: /admin/audit for admins only, filters, pages, NDJSON and
CSV exports of sealed events, and the running gateway's own chain verification."""

from __future__ import annotations

import csv
import io
import json
import uuid

import aiohttp
from support.stack import Stack

from gateway.auditchain import digest


async def call(client, stack: Stack, path: str, token: str):
    headers = {"Authorization": f"Bearer {token}"}
    async with client.get(stack.url(path), headers=headers) as response:
        text = await response.text()
        return response.status, response.headers, text


async def traffic(client, stack: Stack, subject: str) -> None:
    """Two allowed reads and one denied write by `subject`."""
    token = stack.mint(subject)
    for path in ("/api/tickets?limit=1", "/api/departments?limit=1"):
        status, _, _ = await call(client, stack, path, token)
        assert status == 200
    async with client.post(
        stack.url("/api/tickets"), json={"title": "x"}, headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 403


async def test_admin_filters_pages_and_exports_sealed_events(stack, client):
    """Filters by subject and decision; pages with a cursor; every event's hash recomputes."""
    subject = f"audited-{uuid.uuid4().hex[:8]}"
    await traffic(client, stack, subject)
    admin = stack.mint("auditor-1", ("admin",))
    status, _, text = await call(client, stack, f"/admin/audit?subject={subject}", admin)
    assert status == 200, text
    page = json.loads(text)
    assert page["count"] == 3
    assert {e["subject"] for e in page["items"]} == {subject}
    assert [e["time"] for e in page["items"]] == sorted(
        (e["time"] for e in page["items"]), reverse=True
    )
    assert all(digest(e) == e["hash"] for e in page["items"])

    status, _, text = await call(
        client, stack, f"/admin/audit?subject={subject}&decision=deny", admin
    )
    (denied,) = json.loads(text)["items"]
    assert (denied["reason_id"], denied["route"]) == ("authz.denied", "tickets.create")

    seen = []
    path = f"/admin/audit?subject={subject}&limit=1"
    while path:
        status, headers, text = await call(client, stack, path, admin)
        assert status == 200
        seen += [e["event_id"] for e in json.loads(text)["items"]]
        cursor = headers.get("X-Next-Cursor")
        path = f"/admin/audit?subject={subject}&limit=1&cursor={cursor}" if cursor else ""
    assert sorted(seen) == sorted(e["event_id"] for e in page["items"])

    status, headers, text = await call(
        client, stack, f"/admin/audit?subject={subject}&format=ndjson", admin
    )
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert [json.loads(line)["event_id"] for line in text.splitlines()] == [
        e["event_id"] for e in page["items"]
    ]


async def test_csv_export_neutralises_formulas(stack, client):
    """A subject that looks like a spreadsheet formula is exported as text, not as code."""
    subject = f"=HYPERLINK(x{uuid.uuid4().hex[:6]})"
    status, _, _ = await call(client, stack, "/api/tickets?limit=1", stack.mint(subject))
    assert status == 200
    admin = stack.mint("auditor-1", ("admin",))
    query = "/admin/audit?format=csv&route=tickets.list&limit=50"
    status, headers, text = await call(client, stack, query, admin)
    assert status == 200
    assert headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert "'" + subject in {row["subject"] for row in rows}
    assert subject not in {row["subject"] for row in rows}


async def test_only_admins_may_search_and_every_search_is_audited(stack, client):
    """A reader is denied by the policy (403 authz.denied); the admin's search is an event too."""
    status, headers, text = await call(client, stack, "/admin/audit", stack.mint("r-1"))
    assert (status, json.loads(text)["reason_id"]) == (403, "authz.denied")
    status, headers, _ = await call(
        client, stack, "/admin/audit?limit=1", stack.mint("a-1", ("admin",))
    )
    assert status == 200
    (event,) = stack.audit_for(headers["X-Request-Id"])
    assert (event["route"], event["subject"], event["decision"]) == ("audit.search", "a-1", "allow")


async def test_bad_search_parameters_are_refused(stack, client):
    """Unknown, repeated or malformed parameters are 400 request.bad_query, never ignored."""
    admin = stack.mint("a-1", ("admin",))
    for query in ("since=yesterday", "since=2026-11-23T00:00:00", "limit=0", "limit=5000",
                  "decision=maybe", "format=xml", "cursor=!!", "subject=a&subject=b",
                  "order=asc", "subject=x';DROP TABLE audit_events;--&limit=1"):  # fmt: skip
        status, _, text = await call(client, stack, f"/admin/audit?{query}", admin)
        expected = 200 if query.startswith("subject=x'") else 400
        assert status == expected, (query, text)
    status, _, text = await call(client, stack, "/admin/audit?limit=1", admin)
    assert status == 200  # the table is still there


async def test_the_running_gateway_verifies_its_chain(stack):
    """/audit/verify on the admin port walks the live store: intact, with checkpoints."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{stack.admin_port}/audit/verify") as response,
    ):
        body = await response.json()
    assert response.status == 200, body
    assert body["intact"] is True
    assert body["chains"]
    assert all(c["checkpoints"] >= 1 and not c["problems"] for c in body["chains"])
