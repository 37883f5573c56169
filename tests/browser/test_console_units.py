"""The console's pieces without a server: the CSP in each mode, the [console] config checks, the
markup sanitiser, the masking of quarantined records, and how an audit event is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.console.csp import ContentSecurityPolicy, new_nonce
from gateway.console.events import event_view
from gateway.console.quarantine import masked_record
from gateway.console.render import sanitise_markup
from gateway.validation.streams import StreamSpec


def test_enforce_mode_sends_one_policy_with_the_nonce():
    """Enforce: the whole policy is enforced; no report-only header."""
    headers = ContentSecurityPolicy("enforce").headers("abc123")
    policy = headers["Content-Security-Policy"]
    assert "script-src 'nonce-abc123'" in policy
    assert "style-src 'nonce-abc123'" in policy
    assert "unsafe-inline" not in policy
    assert "Content-Security-Policy-Report-Only" not in headers
    assert headers["Reporting-Endpoints"] == 'console-csp="/console/csp-report"'


def test_report_only_mode_keeps_a_baseline_enforced():
    """Report-only: the nonce policy is only reported, but framing, <base>, plugins and
    foreign form targets stay refused."""
    headers = ContentSecurityPolicy("report-only").headers("abc123")
    assert "script-src 'nonce-abc123'" in headers["Content-Security-Policy-Report-Only"]
    enforced = headers["Content-Security-Policy"]
    for directive in ("frame-ancestors 'none'", "base-uri 'none'", "object-src 'none'",
                      "form-action 'self'"):  # fmt: skip
        assert directive in enforced
    assert "script-src" not in enforced


def test_nonces_are_long_and_never_repeat():
    """128 random bits each: a thousand nonces, a thousand values."""
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert min(len(n) for n in nonces) >= 22


@pytest.mark.parametrize(
    ("console", "environment", "message"),
    [
        ('csp_mode = "report-only"', "production", "allow_report_only_in_production"),
        ('report_limit = "lots"', "development", "console.report_limit"),
        ("report_max_bytes = 10", "development", "console.report_max_bytes"),
        ("page_size = 0", "development", "console.page_size"),
        ('csp_mode = "off"', "development", "console.csp_mode"),
    ],
    ids=["report_only_in_production", "bad_limit", "tiny_reports", "empty_page", "unknown_mode"],
)
def test_a_bad_console_config_stops_the_start_naming_the_key(
    tmp_path, console, environment, message
):
    """Each mistake in [console] is refused with the key in the message."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\nenvironment = "{environment}"\n[console]\n{console}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(config, env={})


def test_report_only_in_production_is_allowed_when_chosen_explicitly(tmp_path):
    """With allow_report_only_in_production = true the same config starts."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nenvironment = "production"\n[console]\ncsp_mode = "report-only"\n'
        "allow_report_only_in_production = true\n"
    )
    assert load_config(config, env={}).console.csp_mode == "report-only"


@pytest.mark.parametrize(
    ("markup", "kept", "gone"),
    [
        ("<b>bold</b> and <i>it</i>", "<b>bold</b>", None),
        ("<script>alert(1)</script>x", "x", "<script"),
        ('<img src=x onerror="alert(1)">', "", "<img"),
        ('<a href="javascript:alert(1)">x</a>', "<a", "javascript:"),
        ('<a href="https://example.com" onclick="alert(1)">x</a>', 'href="https://example.com"',
         "onclick"),
        ('<noscript><p title="</noscript><img src=x onerror=alert(1)>">', "", "onerror=alert"),
        ('<p style="background:url(javascript:alert(1))">x</p>', "<p>x</p>", "style"),
        ("<svg><animate onbegin=alert(1)>", "", "<svg"),
    ],
    ids=["formatting", "script", "img_onerror", "javascript_url", "onclick", "mutation_xss",
         "style_attribute", "svg"],
)  # fmt: skip
def test_the_sanitiser_keeps_formatting_and_drops_what_runs(markup, kept, gone):
    """nh3 keeps the allowed tags and safe links; scripts, handlers and styles go."""
    cleaned = str(sanitise_markup(markup))
    assert kept in cleaned
    if gone is not None:
        assert gone not in cleaned
    if "<a" in cleaned:
        assert 'rel="noopener noreferrer nofollow"' in cleaned


def test_sensitive_fields_of_a_quarantined_record_are_masked_at_any_depth():
    """A stream's sensitive pointers are *** in what the console shows; the rest is intact."""
    spec = StreamSpec(name="s", mode="partial", sensitive=("/operator/email", "/tags/1"))
    record = {"operator": {"email": "a@b.c", "name": "Ann"}, "tags": ["x", "secret"], "v": 1}
    assert masked_record(record, spec) == {
        "operator": {"email": "***", "name": "Ann"}, "tags": ["x", "***"], "v": 1
    }  # fmt: skip
    assert masked_record(record, None) is record


def test_only_a_ticket_description_is_offered_as_markup():
    """A ticket route's description is rendered (sanitised); an employee's fields never are."""
    ticket = {"route": "tickets.create", "detail": {"changes": {"description": "<b>x</b>"}}}
    employee = {"route": "employees.create", "detail": {"changes": {"description": "<b>x</b>"}}}
    assert event_view(ticket)["description"] == "<b>x</b>"
    assert event_view(employee)["description"] is None
    assert event_view(employee)["changes"] == [("description", "<b>x</b>")]


def test_templates_ship_with_the_package():
    """pyproject's package-data lists the templates and the script (a wheel must carry them)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'gateway = ["console/templates/*.html", "console/static/*"]' in pyproject
