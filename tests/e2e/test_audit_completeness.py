"""0 missing audit events: a scripted session of known actions leaves exactly the expected
events, in order, sealed in one chain, in the JSON lines and in the DuckDB store alike."""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack

import aiohttp
import pytest
from support.identity import PASSWORDS, start_identity_gateway

from gateway.auditchain import digest
from gateway.testing import read_audit_events


@pytest.fixture
def gateway(stack, tmp_path):
    with ExitStack() as processes:
        yield start_identity_gateway(
            processes, tmp_path / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret,
        )  # fmt: skip


async def scripted_session(gw) -> list[tuple]:
    """Run the known actions; return what each should leave: (kind, route, decision, reason)."""
    expected: list[tuple] = []
    async with gw.session() as session:
        status, body = await gw.login(session, "alice")
        assert status == 200
        alice = body["access_token"]
        expected.append(("auth.login", "identity.token", "allow", None))
        form = {"grant_type": "password", "username": "alice", "password": "wrong password!"}
        status, _, _ = await gw.token(session, form)
        assert status == 400
        expected.append(("auth.login", "identity.token", "deny", "auth.invalid_grant"))
        status, body = await gw.login(session, "root")
        root = body["access_token"]
        expected.append(("auth.login", "identity.token", "allow", None))

        async def api(method, path, token, body=None, want=200):
            headers = {"Authorization": f"Bearer {token}"}
            async with session.request(method, gw.url(path), json=body, headers=headers) as r:
                assert r.status == want, await r.text()
                return await r.json() if r.status != 204 else None

        await api("GET", "/api/tickets?limit=1", alice)
        expected.append(("request", "tickets.list", "allow", None))
        await api("POST", "/api/tickets", alice, {"title": "nope"}, want=403)
        expected.append(("request", "tickets.create", "deny", "authz.denied"))
        ticket = await api("POST", "/api/tickets", root, {"title": "Audit me"}, want=201)
        expected.append(("request", "tickets.create", "allow", None))
        await api("PATCH", f"/api/tickets/{ticket['id']}", root, {"status": "closed"})
        expected.append(("request", "tickets.update", "allow", None))
        await api("POST", "/api/tickets", root, {"title": 7}, want=422)
        expected.append(("request", "tickets.create", "deny", "validation.schema"))
        employee = {"name": "Eve Example", "email": "eve.secret@example.com"}
        await api("POST", "/api/employees", root, employee, want=201)
        expected.append(("request", "employees.create", "allow", None))
        await api("DELETE", f"/api/tickets/{ticket['id']}", root, want=204)
        expected.append(("request", "tickets.delete", "allow", None))
    rotated = gw.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    expected.append(("keys.rotated", "-", None, None))
    added = gw.cli(
        "users",
        "add",
        "carol",
        "--role",
        "reader",
        "--password-stdin",
        stdin=PASSWORDS["alice"] + "\n",
    )
    assert added.returncode == 0, added.stderr
    expected.append(("account.user_added", "-", None, None))
    return expected


async def test_a_scripted_session_leaves_exactly_the_expected_events(gateway):
    """Every action leaves one event, nothing more; the store holds the same events, chained."""
    before = len(read_audit_events(gateway.audit_file))
    expected = await scripted_session(gateway)
    events = read_audit_events(gateway.audit_file)[before:]
    # keys.reloaded: the running gateway noticed the rotation (an event of its own, expected).
    seen = [e for e in events if e["kind"] != "keys.reloaded"]
    actual = [(e["kind"], e["route"], e["decision"], e["reason_id"]) for e in seen]
    assert actual == expected, json.dumps(actual)
    assert len([e for e in events if e["kind"] == "keys.reloaded"]) <= 1

    changes = {e["route"]: e["detail"].get("changes") for e in seen if e["kind"] == "request"}
    assert changes["tickets.update"] == {"status": "closed"}
    # name is sealed at rest upstream (config/routes.toml `sealed`): no value in the JSON lines.
    assert changes["employees.create"] == {"name": "***", "email": "***"}
    assert "eve.secret@example.com" not in gateway.audit_file.read_text()
    assert "Eve Example" not in gateway.audit_file.read_text()

    # The gateway's own events are sealed in its chain as they were written.
    own = [e for e in events if "hash" in e]
    assert all(digest(e) == e["hash"] for e in own)

    # The DuckDB store holds every one of them (the CLI's too, through the inbox), verified.
    admin = gateway.mint("ops", ("admin",))
    ids = {e["event_id"] for e in events}
    async with gateway.session() as session:
        for _ in range(50):
            async with session.get(
                gateway.url("/admin/audit?limit=1000"),
                headers={"Authorization": f"Bearer {admin}"},
            ) as response:
                stored = {e["event_id"] for e in (await response.json())["items"]}
            if ids <= stored:
                break
            await asyncio.sleep(0.2)
        assert ids <= stored
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin_port}/audit/verify") as response,
    ):
        verified = await response.json()
    assert verified["intact"], json.dumps(verified)
