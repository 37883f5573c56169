"""What the console's tests share: the probe stream, sign-in and API helpers, metric reads.

The stream quarantines every record while it has no baseline, so the quarantine page has
records to review without training anything. (A module of its own, not conftest.py: another
conftest.py is importable under that name too.)
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
from support.identity import IdentityGateway, browser_login, cookies_from

STREAM = "console-probe"
STREAMS_TOML = f"""
[defaults]
mode = "all_or_nothing"

[[stream]]
name = "{STREAM}"
mode = "partial"
sensitive = ["operator_email"]

[stream.statistics]
min_samples = 1000000          # never warm: every record is quarantined on cold start
on_cold_start = "quarantine"

[[stream.statistics.checks]]
field = "value"
method = "zscore"
"""
PAGES = ["/console/audit", "/console/policy", "/console/quarantine", "/console/secrets"]


async def admin_token(gateway: IdentityGateway) -> str:
    """root's access token from the password grant (production mints no token by hand)."""
    async with gateway.session() as session:
        status, body = await gateway.login(session, "root")
    assert status == 200, body
    return str(body["access_token"])


async def cookie_session(gateway: IdentityGateway, user: str) -> tuple[str, str]:
    """Sign `user` in with the login form: the Cookie header value and the session's CSRF."""
    async with gateway.session() as session:
        status, body, response = await browser_login(gateway, session, user)
    assert status == 200, body
    cookie = cookies_from(response)["__Host-emp_session"]
    return f"__Host-emp_session={cookie}", str(body["csrf_token"])


async def api(
    gateway: IdentityGateway, method: str, path: str, *, token: str | None = None, **kwargs: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One request through the gateway; the status, the JSON (or text) body, the response."""
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        gateway.session() as session,
        session.request(method, gateway.url(path), headers=headers, **kwargs) as response,
    ):
        text = await response.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return response.status, body, response


async def quarantine_records(gateway: IdentityGateway, token: str, records: list[dict]) -> None:
    """Ingest records into the probe stream: each one is quarantined (cold start)."""
    status, body, _ = await api(gateway, "POST", f"/api/ingest/{STREAM}", token=token, json=records)
    assert status == 201, body
    assert body["quarantined"] == len(records), body


def metric_value(text: str, line_start: str) -> float:
    """The value of the first exposition line starting with `line_start` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate: Any, *, timeout: float = 10.0, what: str = "a condition") -> Any:
    """Poll until predicate() is truthy; its value. Fails the test naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")
