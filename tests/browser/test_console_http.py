"""The console over HTTP, without a browser: every page's CSP and headers, who may open it, the
quarantine review and its CSRF, and the CSP report endpoint (bounded, counted, audited).

One production gateway for the module (tests/browser/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.request
from html.parser import HTMLParser

import pytest
from console_helpers import (
    PAGES,
    STREAM,
    admin_token,
    api,
    cookie_session,
    metric_value,
    quarantine_records,
    wait_for,
)

from gateway.testing import read_audit_events, wait_for_audit_events

# Small enough for the rate test to reach; its own source address keeps it from the others.
CONSOLE_CONFIG = 'report_limit = "6/minute"\nreport_max_bytes = 2048'
NONCE = re.compile(r"'nonce-([A-Za-z0-9_-]+)'")
NONCE_ATTRIBUTE = re.compile(r'<(script|style)\b[^>]*\bnonce="([^"]*)"')


def csp_report(directive: str = "script-src-elem", blocked: str = "inline", **extra) -> dict:
    return {
        "csp-report": {
            "document-uri": "https://localhost:8443/console/audit",
            "violated-directive": directive,
            "effective-directive": directive,
            "original-policy": "default-src 'none'; script-src 'nonce-abc'",
            "disposition": "enforce",
            "blocked-uri": blocked,
            "status-code": 200,
            **extra,
        }
    }


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.found.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every start tag of a page and its attributes, as an HTML parser reads them."""
    parser = _Tags()
    parser.feed(page)
    return parser.found


def _json(document) -> bytes:
    return json.dumps(document).encode()


def metrics(gateway) -> str:
    url = f"http://127.0.0.1:{gateway.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


@pytest.mark.parametrize("path", PAGES)
async def test_every_page_has_a_nonce_csp_without_unsafe_inline(console_gateway, path):
    """Each page: HTML under an enforced CSP whose nonce is on every script and style tag,
    framing refused, and nothing cached."""
    cookie, _ = await cookie_session(console_gateway, "root")
    status, body, response = await api(console_gateway, "GET", path, headers={"Cookie": cookie})
    assert status == 200, body
    headers = response.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "base-uri 'none'" in csp
    assert "report-uri /console/csp-report" in csp
    assert "Content-Security-Policy-Report-Only" not in headers  # production: enforced
    (nonce,) = set(NONCE.findall(csp))
    tags = NONCE_ATTRIBUTE.findall(body)
    assert {tag for tag, _ in tags} == {"script", "style"}
    assert {value for _, value in tags} == {nonce}
    assert "<script>" not in body  # no script without the nonce
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"


async def test_every_response_gets_its_own_nonce(console_gateway):
    """Two loads of the same page carry different nonces: a nonce seen once is worth nothing."""
    cookie, _ = await cookie_session(console_gateway, "root")
    nonces = set()
    for _ in range(3):
        _, _, response = await api(
            console_gateway, "GET", "/console/audit", headers={"Cookie": cookie}
        )
        nonces |= set(NONCE.findall(response.headers["Content-Security-Policy"]))
    assert len(nonces) == 3


async def test_the_script_is_served_with_the_hash_its_page_names(console_gateway):
    """The page's integrity= is the SHA-384 of the script the gateway serves (SRI)."""
    cookie, _ = await cookie_session(console_gateway, "root")
    _, page, _ = await api(console_gateway, "GET", "/console/audit", headers={"Cookie": cookie})
    src, integrity = re.search(r'<script src="([^"]+)" integrity="([^"]+)"', page).groups()
    async with (
        console_gateway.session() as session,
        session.get(console_gateway.url(src), headers={"Cookie": cookie}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
        script = await response.read()
    digest = base64.b64encode(hashlib.sha384(script).digest()).decode()
    assert integrity == f"sha384-{digest}"
    assert b"innerHTML" not in script


async def test_the_front_page_sends_the_browser_to_the_audit_page(console_gateway):
    """GET /console answers 303 to /console/audit."""
    cookie, _ = await cookie_session(console_gateway, "root")
    status, _, response = await api(
        console_gateway, "GET", "/console", headers={"Cookie": cookie}, allow_redirects=False
    )
    assert (status, response.headers["Location"]) == (303, "/console/audit")


@pytest.mark.parametrize(
    ("user", "path"),
    [("alice", "/console/audit"), ("bob", "/console/secrets"), ("alice", "/console/quarantine")],
    ids=["reader_audit", "reader_secrets", "reader_quarantine"],
)
async def test_a_reader_is_refused_by_the_policy_with_one_audit_event(console_gateway, user, path):
    """A signed-in reader gets the JSON denial (403 authz.denied, no reasons in production) and
    the refusal is exactly one audit event, decided by the policy."""
    cookie, _ = await cookie_session(console_gateway, user)
    status, body, response = await api(console_gateway, "GET", path, headers={"Cookie": cookie})
    assert status == 403
    assert set(body) == {"error", "reason_id", "request_id"}
    assert body["reason_id"] == "authz.denied"
    assert response.headers["Content-Type"].startswith("application/json")
    (event,) = wait_for_audit_events(console_gateway.audit_file, body["request_id"])
    assert (event["subject"], event["decision"], event["reason_id"]) == (
        user,
        "deny",
        "authz.denied",
    )
    assert event["reasons"] == ["rbac.action_not_granted"]
    assert event["policy_revision"]


async def test_without_a_session_the_console_is_401(console_gateway):
    """No cookie, no token: 401 authn.missing_token, before any route is named."""
    status, body, _ = await api(console_gateway, "GET", "/console/audit")
    assert (status, body["reason_id"]) == (401, "authn.missing_token")


async def test_audit_filters_select_events_and_a_bad_one_is_400(console_gateway):
    """subject= narrows the page to that subject's events; an unknown parameter is refused."""
    cookie, _ = await cookie_session(console_gateway, "root")
    await cookie_session(console_gateway, "bob")
    _, page, _ = await api(
        console_gateway, "GET", "/console/audit?subject=bob&decision=&limit=20",
        headers={"Cookie": cookie},
    )  # fmt: skip
    subjects = set(re.findall(r'href="/console/audit\?subject=([^"]+)"', page))
    assert subjects == {"bob"}
    status, body, _ = await api(
        console_gateway, "GET", "/console/audit?format=csv", headers={"Cookie": cookie}
    )
    assert (status, body["reason_id"]) == (400, "request.bad_query")


async def test_ticket_markup_is_escaped_and_the_description_sanitised(console_gateway):
    """A ticket's title is shown as text; its description keeps only the allowed markup."""
    token = await admin_token(console_gateway)
    title = '"><script>window.__pwned=1</script>'
    description = (
        '<b>bold</b><img src=x onerror="window.__pwned=2"><a href="javascript:alert(1)">x</a>'
    )
    status, ticket, _ = await api(
        console_gateway, "POST", "/api/tickets", token=token,
        json={"title": title, "description": description},
    )  # fmt: skip
    assert status == 201, ticket
    cookie, _ = await cookie_session(console_gateway, "root")
    _, page, _ = await api(
        console_gateway, "GET", "/console/audit?route=tickets.create", headers={"Cookie": cookie}
    )
    assert "&#34;&gt;&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page  # as text
    tags = tags_of(page)
    assert [attrs.get("src") for tag, attrs in tags if tag == "script"] == [
        "/console/static/console.js"
    ]
    assert not [attrs for _, attrs in tags if any(name.startswith("on") for name in attrs)]
    assert not [a for t, a in tags if t == "a" and (a.get("href") or "").startswith("javascript")]
    assert "<b>bold</b>" in page  # allowed markup, rendered
    assert not [attrs for tag, attrs in tags if tag == "img"]


async def test_admin_accepts_a_quarantined_record_as_themselves(console_gateway):
    """The review POST (JSON + X-CSRF-Token) accepts the record upstream, names the user as
    reviewer, and is audited as console.quarantine_review."""
    token = await admin_token(console_gateway)
    await quarantine_records(console_gateway, token, [{"value": 1.5, "operator_email": "x@y.z"}])
    cookie, csrf = await cookie_session(console_gateway, "root")
    _, page, _ = await api(
        console_gateway, "GET", f"/console/quarantine?stream={STREAM}", headers={"Cookie": cookie}
    )
    assert "x@y.z" not in page  # the stream's sensitive field is masked
    item_id = re.search(rf"/console/quarantine/{STREAM}/(\d+)/accept", page).group(1)
    path = f"/console/quarantine/{STREAM}/{item_id}/accept"
    headers = {"Cookie": cookie, "X-CSRF-Token": csrf}
    status, body, response = await api(
        console_gateway, "POST", path, headers=headers, json={"note": "looks right"}
    )
    assert status == 200, body
    assert (body["status"], body["reviewed_by"], body["review_note"]) == (
        "accepted", "root", "looks right"
    )  # fmt: skip
    request_id = response.headers["X-Request-Id"]
    (event,) = wait_for_audit_events(console_gateway.audit_file, request_id)
    assert event["kind"] == "console.quarantine_review"
    assert event["subject"] == "root"
    assert event["detail"]["review"] == {
        "stream": STREAM, "id": int(item_id), "decision": "accept", "upstream_status": 200
    }  # fmt: skip
    assert event["detail"]["changes"] == {"note": "looks right"}
    again, body, _ = await api(console_gateway, "POST", path, headers=headers, json={})
    assert again == 409, body  # a record is reviewed once


@pytest.mark.parametrize(
    ("headers", "reason_id"),
    [
        ({}, "csrf.missing"),
        ({"X-CSRF-Token": "not-the-token"}, "csrf.mismatch"),
        ({"Origin": "https://evil.example"}, "csrf.cross_origin"),
    ],
    ids=["no_token", "wrong_token", "other_origin"],
)
async def test_a_review_without_the_sessions_csrf_proof_is_refused(
    console_gateway, headers, reason_id
):
    """A cookie-authenticated review must carry the session's CSRF token from this origin."""
    token = await admin_token(console_gateway)
    await quarantine_records(console_gateway, token, [{"value": 2.5}])
    cookie, csrf = await cookie_session(console_gateway, "root")
    _, page, _ = await api(
        console_gateway, "GET", f"/console/quarantine?stream={STREAM}", headers={"Cookie": cookie}
    )
    item_id = re.search(rf"/console/quarantine/{STREAM}/(\d+)/discard", page).group(1)
    sent = {"Cookie": cookie, **({"X-CSRF-Token": csrf} if "Origin" in headers else {}), **headers}
    status, body, _ = await api(
        console_gateway, "POST", f"/console/quarantine/{STREAM}/{item_id}/discard",
        headers=sent, json={},
    )  # fmt: skip
    assert (status, body["reason_id"]) == (403, reason_id)
    _, listing, _ = await api(
        console_gateway, "GET", f"/api/ingest/{STREAM}/quarantine?status=pending", token=token
    )
    assert int(item_id) in {item["id"] for item in listing["items"]}  # still pending


async def test_a_csp_report_is_counted_and_audited_without_its_urls(console_gateway):
    """A report-uri body: 204, one csp.violation event naming the directive (closed set),
    gateway_csp_violations_total up by one; no URL or sample from the report is kept."""
    series = 'gateway_csp_violations_total{directive="script-src-elem",disposition="enforce"}'
    before = metric_value(metrics(console_gateway), series)
    report = csp_report(
        "script-src-elem", "https://evil.example/steal?token=planted-csp-secret",
        **{"script-sample": "planted-csp-sample"},
    )  # fmt: skip
    status, _, response = await api(
        console_gateway, "POST", "/console/csp-report", data=_json(report),
        headers={"Content-Type": "application/csp-report"},
    )  # fmt: skip
    assert status == 204
    (event,) = wait_for_audit_events(console_gateway.audit_file, response.headers["X-Request-Id"])
    assert event["kind"] == "csp.violation"
    assert event["subject"] is None
    assert event["detail"]["csp"]["violations"] == [
        {"directive": "script-src-elem", "disposition": "enforce", "blocked": "cross-origin",
         "page": "/console/audit"}
    ]  # fmt: skip
    trail = console_gateway.audit_file.read_text()
    assert "planted-csp-secret" not in trail
    assert "planted-csp-sample" not in trail
    after = wait_for(
        lambda: metric_value(metrics(console_gateway), series) >= before + 1, what="the metric"
    )
    assert after


async def test_reporting_api_bodies_are_read_and_unknown_directives_lumped(console_gateway):
    """application/reports+json: each csp-violation counted; other report types ignored; a
    directive outside the known set is "other", never a new label value."""
    body = [
        {"type": "csp-violation", "url": "https://localhost:8443/console/policy",
         "body": {"documentURL": "https://localhost:8443/console/policy",
                  "effectiveDirective": "style-src-attr", "blockedURL": "inline",
                  "disposition": "enforce"}},
        {"type": "csp-violation", "body": {"effectiveDirective": "made-up-directive-1234",
                                           "disposition": "report", "blockedURL": "data:x"}},
        {"type": "deprecation", "body": {"id": "x"}},
    ]  # fmt: skip
    status, _, response = await api(
        console_gateway, "POST", "/console/csp-report", data=_json(body),
        headers={"Content-Type": "application/reports+json"},
    )  # fmt: skip
    assert status == 204
    (event,) = wait_for_audit_events(console_gateway.audit_file, response.headers["X-Request-Id"])
    assert event["detail"]["csp"] == {
        "violations": [
            {"directive": "style-src-attr", "disposition": "enforce", "blocked": "inline",
             "page": "/console/policy"},
            {"directive": "other", "disposition": "report", "blocked": "data", "page": "other"},
        ],
        "ignored": 1,
    }  # fmt: skip
    assert "made-up-directive-1234" not in metrics(console_gateway)


@pytest.mark.parametrize(
    ("content_type", "data", "status", "reason_id"),
    [
        ("text/plain", b"{}", 415, "validation.content_type"),
        ("application/csp-report", b"{not json", 400, "validation.malformed_json"),
        ("application/csp-report", b'{"csp-report": "x"}', 422, "validation.schema"),
        ("application/csp-report", b"[" + b'"x",' * 1200 + b'"x"]', 413, "request.too_large"),
    ],
    ids=["wrong_type", "not_json", "wrong_shape", "too_large"],
)
async def test_bad_report_bodies_are_refused_and_audited(
    console_gateway, content_type, data, status, reason_id
):
    """The endpoint takes only bounded JSON reports; each refusal is one audit event."""
    got, body, _ = await api(
        console_gateway, "POST", "/console/csp-report", data=data,
        headers={"Content-Type": content_type},
    )  # fmt: skip
    assert (got, body["reason_id"]) == (status, reason_id)
    (event,) = wait_for_audit_events(console_gateway.audit_file, body["request_id"])
    assert (event["route"], event["reason_id"]) == ("console.csp_report", reason_id)


async def test_one_address_past_the_report_limit_is_dropped_and_counted(console_gateway):
    """Past console.report_limit (6/minute here) an address's reports are answered 204 but
    not read: no csp.violation event, gateway_csp_reports_dropped_total counts them."""
    before = metric_value(metrics(console_gateway), "gateway_csp_reports_dropped_total ")
    kinds = []
    async with console_gateway.session(local_ip="127.0.0.9") as session:
        for _ in range(8):
            async with session.post(
                console_gateway.url("/console/csp-report"), data=_json(csp_report()),
                headers={"Content-Type": "application/csp-report"},
            ) as response:  # fmt: skip
                assert response.status == 204
                kinds.append(response.headers["X-Request-Id"])
    events = [
        wait_for_audit_events(console_gateway.audit_file, request_id)[0] for request_id in kinds
    ]
    assert [e["kind"] for e in events] == ["csp.violation"] * 6 + ["request"] * 2
    assert events[-1]["detail"]["csp"] == {"dropped": "rate_limited"}
    dropped = metric_value(metrics(console_gateway), "gateway_csp_reports_dropped_total ")
    assert dropped == before + 2


def test_audit_trail_never_holds_the_session_cookie(console_gateway):
    """No console request wrote a cookie or CSRF value into the audit trail."""
    assert "__Host-emp_session=" not in console_gateway.audit_file.read_text()
    assert read_audit_events(console_gateway.audit_file)
