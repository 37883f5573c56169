"""Hot reload while the gateway runs: an edit is tested, then swapped in; a broken one is kept
out, shown in /readyz, counted and audited; SIGHUP reloads when watching is off."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import ExitStack

import aiohttp
import pytest
from support.identity import copy_policies, start_identity_gateway

from gateway.testing import read_audit_events


async def ready(gateway) -> dict:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin_port}/readyz") as r,
    ):
        return await r.json()


async def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


def audit_kinds(gateway) -> list[str]:
    return [e["kind"] for e in read_audit_events(gateway.audit_file)]


@pytest.fixture
def reloading_gateway(stack, tmp_path):
    """A gateway on its own copy of policies/, watched for changes."""
    policies = copy_policies(tmp_path / "policies")
    with ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, tmp_path / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, policy_dir=policies,
        )  # fmt: skip
        yield gateway, policies


async def test_an_edit_is_tested_then_swapped_in_and_audited(reloading_gateway):
    """A change to the Rego (here a comment) yields a new revision, audited with its hash."""
    gateway, policies = reloading_gateway
    before = (await ready(gateway))["policy_revision"]
    rego = policies / "gateway" / "authz.rego"
    rego.write_text(rego.read_text() + "\n# reviewed by the security team\n")

    async def changed():
        body = await ready(gateway)
        return body if body["policy_revision"] != before else None

    body = await wait_for(changed)
    assert body["checks"]["policy"] is True, body
    assert body["policy_reload"]["last_error"] is None
    reloaded = [e for e in read_audit_events(gateway.audit_file) if e["kind"] == "policy.reloaded"]
    assert reloaded[-1]["detail"]["revision"] == body["policy_revision"]
    assert reloaded[-1]["detail"]["previous"] == before


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("gateway/authz.rego", "default allow := false", "default allow := false {"),
        ("data.json", '"reader"', '"reader_renamed"'),
    ],
    ids=["syntax_error", "tests_fail"],
)
async def test_a_broken_edit_keeps_the_last_good_revision(reloading_gateway, file, old, new):
    """A broken edit is rejected: the old revision serves, /readyz and the audit say why."""
    gateway, policies = reloading_gateway
    before = (await ready(gateway))["policy_revision"]
    target = policies / file
    target.write_text(target.read_text().replace(old, new, 1))

    async def rejected():
        body = await ready(gateway)
        return body if body["policy_reload"]["last_error"] else None

    body = await wait_for(rejected)
    assert body["checks"]["policy"] is True
    assert body["policy_revision"] == before
    assert "policy test exited" in body["policy_reload"]["last_error"]
    assert "policy.reload_rejected" in audit_kinds(gateway)
    token = gateway.mint("rita", ("reader",))
    async with (
        gateway.session() as session,
        session.get(gateway.url("/api/tickets"), headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        assert r.status == 200  # still the last good policy
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as r,
    ):
        assert 'gateway_policy_reloads_total{outcome="rejected"}' in await r.text()


async def test_sighup_reloads_when_watching_is_off(stack, tmp_path):
    """With policy.watch = false nothing moves until SIGHUP."""
    policies = copy_policies(tmp_path / "policies")
    with ExitStack() as processes:
        gateway = start_identity_gateway(
            processes, tmp_path / "gw", upstream_port=stack.upstream_port,
            upstream_secret=stack.secret, policy_dir=policies, policy="watch = false",
        )  # fmt: skip
        before = (await ready(gateway))["policy_revision"]
        rego = policies / "gateway" / "authz.rego"
        rego.write_text(rego.read_text() + "\n# a change nobody watches\n")
        await asyncio.sleep(2.0)
        assert (await ready(gateway))["policy_revision"] == before
        gateway.process.send_signal(signal.SIGHUP)

        async def changed():
            body = await ready(gateway)
            return body if body["policy_revision"] != before else None

        await wait_for(changed)
        assert "policy.reloaded" in audit_kinds(gateway)


def add_auditor(policies, *, with_matrix: bool) -> None:
    """The security team's edit: a role that reads tickets, as data (and its matrix rows)."""
    data = json.loads((policies / "data.json").read_text())
    data["rbac"]["roles"]["auditor"] = {
        "description": "Reads tickets, nothing else.",
        "permissions": {"tickets": ["read"]},
    }
    if with_matrix:
        matrix = (policies / "matrix.toml").read_text()
        table = matrix.split("[roles.reader]\n", 1)[1].split("\n[", 1)[0]
        keys = [line.partition("=")[0].strip() for line in table.splitlines()]
        rows = [
            f"{key} = " + ('"allow"' if key.startswith('"GET tickets.') else '"deny"')
            for key in keys
            if key.startswith('"')
        ]
        matrix += "\n[roles.auditor]\n" + "\n".join(rows) + "\n"
        (policies / "matrix.toml").write_text(matrix)
    (policies / "data.json").write_text(json.dumps(data, indent=2))


async def test_a_new_role_with_its_matrix_rows_takes_effect(reloading_gateway):
    """Adding a role in data.json plus its matrix rows is accepted and grants at once."""
    gateway, policies = reloading_gateway
    before = (await ready(gateway))["policy_revision"]
    token = gateway.mint("aude", ("auditor",))
    add_auditor(policies, with_matrix=True)

    async def changed():
        body = await ready(gateway)
        return body if body["policy_revision"] != before else None

    body = await wait_for(changed)
    assert body["policy_reload"]["last_error"] is None
    async with gateway.session() as session:
        for path, expected in (("/api/tickets", 200), ("/api/departments", 403)):
            async with session.get(
                gateway.url(path), headers={"Authorization": f"Bearer {token}"}
            ) as r:
                assert r.status == expected, path


async def test_a_new_role_without_matrix_rows_is_rejected(reloading_gateway):
    """A role the matrix does not cover fails the reload's tests: the old revision stays."""
    gateway, policies = reloading_gateway
    before = (await ready(gateway))["policy_revision"]
    add_auditor(policies, with_matrix=False)

    async def rejected():
        body = await ready(gateway)
        return body if body["policy_reload"]["last_error"] else None

    body = await wait_for(rejected)
    assert body["policy_revision"] == before
    assert "auditor" in body["policy_reload"]["last_error"]
