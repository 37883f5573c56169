"""The console in a real browser: Debian's Chromium, driven by Selenium through chromium-driver.

The browser signs in with the login form, opens every console page, and views XSS payloads
planted through the API (tickets, an employee, a quarantined record, a user agent). None may
run: no dialog, no script or on* attribute of theirs in the DOM, no DOM change after load. An
inline script injected at run time is blocked by the CSP and reported: the report reaches the
endpoint, is counted in the metric and audited. A screenshot of each page goes to
var/artifacts/screenshots/ (git-ignored; CI keeps it as an artifact).

One gateway and one browser for the module; the tests run in file order, each building on the
signed-in browser of the one before.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import urllib.request
from pathlib import Path

import pytest
from console_helpers import (
    STREAM,
    admin_token,
    api,
    metric_value,
    quarantine_records,
    wait_for,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from support.identity import PASSWORDS
from support.stack import REPO

from gateway.testing import read_audit_events

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO / "var" / "artifacts" / "screenshots"

# Classic payloads, each planted as a ticket's title and its description. The marker number
# lets a failure name the payload that ran.
PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "<svg onload=alert(3)>",
    "<svg><script>alert(4)</script></svg>",
    "javascript:alert(5)",
    '<a href="javascript:alert(6)">click me</a>',
    '"><script>alert(7)</script>',
    "'><img src=x onerror=alert(8)>",
    '" onmouseover="alert(9)" autofocus onfocus="alert(9)" x="',
    "</title><script>alert(10)</script>",
    "</textarea><script>alert(11)</script>",
    "{{constructor.constructor('alert(12)')()}}",
    "{{ 7*7 }} ${alert(13)} {% for x in range(3) %}x{% endfor %} #{alert(13)}",
    '<noscript><p title="</noscript><img src=x onerror=alert(14)>">',
    '<iframe src="javascript:alert(15)"></iframe>',
    "<body onload=alert(16)>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(17)>",
    "<details open ontoggle=alert(18)>",
    '<object data="javascript:alert(19)"></object>',
    '<embed src="data:text/html,<script>alert(20)</script>">',
    "<style>@import 'javascript:alert(21)';</style>",
    "<input autofocus onfocus=alert(22)>",
    '<a href="&#106;avascript:alert(23)">entity</a>',
    '<base href="https://evil.example/">',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(25)">',
    "<svg><animate onbegin=alert(26) attributeName=x dur=1s>",
    '<form action="javascript:alert(27)"><button>go</button></form>',
    '<div style="background:url(javascript:alert(28))">styled</div>',
    "<scr<script>ipt>alert(29)</scr</script>ipt>",
    "<img src=x:alert(30) onerror=eval(src)>",
    "<x contenteditable onblur=alert(31)>focus me</x>",
    "<!--<img src=--><img src=x onerror=alert(32)//>",
]
# Set on the page before any of its own script runs (DevTools, so the CSP does not apply):
# dialogs are recorded (and still opened, so the driver can see them too).
TRAP = """
window.__dialogs = [];
for (const name of ["alert", "confirm", "prompt"]) {
  const original = window[name].bind(window);
  window[name] = (message) => { window.__dialogs.push([name, String(message)]); return original(message); };
}
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push([e.effectiveDirective, e.blockedURI, e.disposition]));
"""
# What may not be in a console page's DOM, whatever the data: elements that run, load or
# restyle, and every attribute that is an event handler.
DOM_PROBE = """
const dangerous = "iframe, object, embed, img, svg, math, base, link, noscript, template, frame,"
  + " video, audio, meta[http-equiv], form[action^='javascript'], a[href^='javascript'],"
  + " [style], [contenteditable], input[autofocus]";
const handlers = [];
for (const element of document.querySelectorAll("*")) {
  for (const attribute of element.attributes) {
    if (attribute.name.toLowerCase().startsWith("on")) handlers.push(element.tagName + " " + attribute.name);
  }
}
return {
  scripts: [...document.scripts].map((s) => [s.getAttribute("src"), s.hasAttribute("nonce"), s.text]),
  styles: document.querySelectorAll("style").length,
  dangerous: [...document.querySelectorAll(dangerous)].map((e) => e.outerHTML.slice(0, 120)),
  handlers: handlers,
  dialogs: window.__dialogs,
  title: document.title,
  html: document.documentElement.outerHTML.length,
};
"""


def spki_hash(certificate: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's SPKI allow-list takes."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def planted(console_gateway):
    """The payloads, through the API: tickets, an employee, a quarantined record, a user agent."""

    async def plant() -> dict[str, list]:
        token = await admin_token(console_gateway)
        tickets = []
        for payload in PAYLOADS:
            status, body, _ = await api(
                console_gateway, "POST", "/api/tickets", token=token,
                json={"title": payload, "description": payload},
            )  # fmt: skip
            assert status == 201, (payload, body)
            tickets.append(body["id"])
        status, body, _ = await api(
            console_gateway, "POST", "/api/employees", token=token,
            json={"name": "<img src=x onerror=alert(40)>Mallory", "email": "m@example.com"},
        )  # fmt: skip
        assert status == 201, body
        await quarantine_records(
            console_gateway, token,
            [{"value": 7.0, "label": "<svg onload=alert(41)>", "operator_email": "o@example.com"}],
        )  # fmt: skip
        await api(
            console_gateway, "GET", "/api/tickets?limit=1", token=token,
            headers={"User-Agent": "<script>alert(42)</script>"},
        )  # fmt: skip
        return {"tickets": tickets}

    return asyncio.run(plant())


@pytest.fixture(scope="module")
def browser(console_gateway):
    """Headless Chromium that trusts only the test gateway's certificate (by its key)."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
        f"--ignore-certificate-errors-spki-list={spki_hash(console_gateway.root / 'certs/server.pem')}",
        "--short-reporting-delay",  # Reporting API uploads in ~100 ms instead of a minute
    ):  # fmt: skip
        options.add_argument(argument)
    options.unhandled_prompt_behavior = "ignore"  # a dialog stays open for the check to see
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": TRAP})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def origin(gateway) -> str:
    # localhost, not 127.0.0.1: the origin the gateway accepts for cookie requests.
    return f"https://localhost:{gateway.https_port}"


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 10).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def screenshot(driver, name: str) -> None:
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def assert_nothing_ran(driver, page: str) -> dict:
    """The page's DOM holds only our script and style, no dangerous element or handler, no
    dialog was opened, and nothing changes after load."""
    probe = driver.execute_script(DOM_PROBE)
    assert probe["dialogs"] == [], (page, probe["dialogs"])
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is the check
    assert probe["scripts"] == [["/console/static/console.js", True, ""]], page
    assert probe["styles"] == 1, page
    assert probe["dangerous"] == [], (page, probe["dangerous"])
    assert probe["handlers"] == [], (page, probe["handlers"])
    assert probe["title"].endswith("· EMP console"), probe["title"]
    before = driver.execute_script("return document.documentElement.outerHTML")
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    WebDriverWait(driver, 1.5, poll_frequency=0.5).until_not(
        lambda d: d.execute_script("return window.__dialogs.length")
    )
    after = driver.execute_script("return document.documentElement.outerHTML")
    assert after == before, f"{page}: the DOM changed after load"
    return probe


def test_signs_in_with_the_login_form(console_gateway, browser, planted):
    """The browser signs in as root through GET/POST /auth/login and holds the session."""
    open_page(browser, origin(console_gateway) + "/auth/login")
    screenshot(browser, "login")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys(PASSWORDS["root"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 10).until(expected_conditions.url_contains("/auth/session"))
    session = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    assert (session["sub"], session["roles"]) == ("root", ["admin"])
    cookie = browser.get_cookie("__Host-emp_session")
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")


def test_the_audit_page_shows_every_payload_as_text_and_runs_none(
    console_gateway, browser, planted
):
    """/console/audit lists the tickets' payloads: each title is visible as typed, the
    sanitised descriptions keep no handler, and no payload runs."""
    open_page(browser, origin(console_gateway) + "/console")
    assert browser.current_url.endswith("/console/audit")
    open_page(browser, origin(console_gateway) + "/console/audit?route=tickets.create&limit=100")
    screenshot(browser, "console-audit")
    assert_nothing_ran(browser, "audit")
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "dl.changes dd")]
    for payload in PAYLOADS:
        assert payload in shown, f"title not shown as text: {payload}"
    assert browser.execute_script("return typeof window.__pwned") == "undefined"


def test_the_audit_page_escapes_employee_names_and_user_agents(console_gateway, browser, planted):
    """An employee's name and a client's user agent are data too: shown, never run."""
    open_page(browser, origin(console_gateway) + "/console/audit?limit=200")
    assert_nothing_ran(browser, "audit, every route")
    text = browser.find_element(By.ID, "events").text
    assert "<img src=x onerror=alert(40)>Mallory" in text
    assert "<script>alert(42)</script>" in text


@pytest.mark.parametrize("page", ["policy", "secrets"])
def test_the_policy_and_secrets_pages_render_clean(console_gateway, browser, planted, page):
    """The policy status and the secrets inventory render under the CSP with nothing else."""
    open_page(browser, origin(console_gateway) + f"/console/{page}")
    screenshot(browser, f"console-{page}")
    assert_nothing_ran(browser, page)
    if page == "policy":
        revision = browser.find_element(By.ID, "revision").text
        assert len(revision) == 16
    else:
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#secrets td:first-child")]
        assert {"signing_key", "upstream_secret", "session_key"} <= set(names)


def test_quarantine_accept_in_the_browser(console_gateway, browser, planted):
    """The quarantine page shows the planted record as text (its sensitive field masked); the
    Accept button (the console's script, CSRF header) accepts it as root, with a note that is
    itself a payload."""
    open_page(browser, origin(console_gateway) + f"/console/quarantine?stream={STREAM}")
    screenshot(browser, "console-quarantine")
    assert_nothing_ran(browser, "quarantine")
    table = browser.find_element(By.ID, "records").text
    assert "<svg onload=alert(41)>" in table
    assert "o@example.com" not in table
    row = next(
        r for r in browser.find_elements(By.CSS_SELECTOR, "#records tbody tr")
        if "alert(41)" in r.text
    )  # fmt: skip
    item_id = row.find_element(By.CSS_SELECTOR, "td").text
    row.find_element(By.NAME, "note").send_keys("<img src=x onerror=alert(43)>")
    row.find_element(By.CSS_SELECTOR, "button[value=accept]").click()
    WebDriverWait(browser, 10).until(expected_conditions.staleness_of(row))
    open_page(browser, origin(console_gateway) + f"/console/quarantine?stream={STREAM}&status=all")
    assert_nothing_ran(browser, "quarantine, all")
    reviewed = next(
        r for r in browser.find_elements(By.CSS_SELECTOR, "#records tbody tr")
        if r.find_element(By.CSS_SELECTOR, "td").text == item_id
    )  # fmt: skip
    assert "accepted" in reviewed.text
    assert "root" in reviewed.text
    assert "<img src=x onerror=alert(43)>" in reviewed.text
    events = [
        e for e in read_audit_events(console_gateway.audit_file)
        if e["kind"] == "console.quarantine_review"
    ]  # fmt: skip
    assert [(e["subject"], e["detail"]["review"]["id"], e["status"]) for e in events] == [
        ("root", int(item_id), 200)
    ]


def test_an_injected_inline_script_is_blocked_and_reported(console_gateway, browser, planted):
    """A <script> with inline text added at run time does not run (no nonce); the browser
    reports it: the endpoint audits a csp.violation and the metric counts it."""
    series = 'gateway_csp_violations_total{directive="script-src-elem",disposition="enforce"}'
    before = metric_value(_metrics(console_gateway), series)
    open_page(browser, origin(console_gateway) + "/console/audit")
    browser.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.__injected = 1';"
        "document.body.appendChild(s);"
    )
    violations = wait_for(
        lambda: browser.execute_script("return window.__violations"), what="the browser's event"
    )
    assert violations[0][0] == "script-src-elem"
    assert browser.execute_script("return typeof window.__injected") == "undefined"
    reported = wait_for(
        lambda: [
            e for e in read_audit_events(console_gateway.audit_file)
            if e["kind"] == "csp.violation" and "Chrome" in (e["user_agent"] or "")
        ],
        what="the csp.violation audit event",
    )  # fmt: skip
    violation = reported[0]["detail"]["csp"]["violations"][0]
    assert violation == {
        "directive": "script-src-elem", "disposition": "enforce", "blocked": "inline",
        "page": "/console/audit",
    }  # fmt: skip
    assert wait_for(
        lambda: metric_value(_metrics(console_gateway), series) > before, what="the metric"
    )
    screenshot(browser, "console-audit-after-injection")


def _metrics(gateway) -> str:
    url = f"http://127.0.0.1:{gateway.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def test_screenshots_are_kept_outside_git():
    """Every page left a screenshot in var/, which git ignores."""
    names = {path.stem for path in SCREENSHOTS.glob("*.png")}
    assert {"login", "console-audit", "console-policy", "console-secrets",
            "console-quarantine"} <= names  # fmt: skip
    assert "var/" in (REPO / ".gitignore").read_text().splitlines()
