"""The alert rules, the gateway's /metrics and the Grafana dashboard, checked with the real
tools. promtool checks the rules, runs their unit tests and lints the metrics. A real
Prometheus scrapes the session's gateway with the rules loaded and runs every dashboard query."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml
from support.prometheus_server import (
    ALERT_RULES,
    DASHBOARD,
    PROMETHEUS_CONFIG,
    RULE_TESTS,
    prometheus_server,
    promtool,
    wait_until,
)

RULE_GROUPS = {"emp_gateway_hourly", "emp_gateway_alerts"}
# Series the rules may name that the gateway does not export: `up` is Prometheus's own, and
# gateway_secret_age_seconds{secret} is the secret-age family still to come.
NOT_FROM_THE_GATEWAY = {"up"}

# What to blank out of a PromQL expression before reading metric names from it: strings,
# label matchers, ranges, and label lists of by/without/on/ignoring/group_*.
_NOT_NAMES = re.compile(
    r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]'
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_NAME = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_OPERATORS = {"and", "or", "unless", "offset", "bool"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels or operators)."""
    names = set()
    for match in _NAME.finditer(_NOT_NAMES.sub(" ", expr)):
        name, is_call = match.groups()
        if not is_call and name not in _OPERATORS:
            names.add(name)
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name in a Prometheus text exposition, with the histograms' suffixes."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def series_labels(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of one series name in a text exposition (label order varies by client)."""
    pair = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    return [dict(pair.findall(line.partition("}")[0])) for line in lines]


def load_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows' nested panels included."""
    found = []
    panels = list(json.loads(DASHBOARD.read_text())["panels"])
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])
        found += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    return found


def send(
    stack,
    method: str,
    path: str,
    *,
    token: str = "",
    body: bytes = b"",
    content_type: str = "application/json",
) -> int:
    """One HTTPS request to the stack; its status (a refusal is an answer, not an error)."""
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = stack.url(path)  # always https://127.0.0.1:<port>
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)  # noqa: S310
    context = ssl.create_default_context(cafile=str(stack.ca_file))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def gateway_metrics(stack) -> str:
    """The stack's /metrics text, after requests that create the labelled series: an allowed
    read, a missing token, a policy denial, a rejected ingest record and a failed sign-in."""
    reader = stack.mint("prometheus-probe", ("reader",))
    ingest = stack.mint("prometheus-etl", ("ingest_process",))
    assert send(stack, "GET", "/api/tickets", token=reader) == 200
    assert send(stack, "GET", "/api/tickets") == 401
    assert send(stack, "POST", "/api/tickets", token=reader, body=b"{}") == 403
    assert send(stack, "POST", "/api/ingest/readings", token=ingest, body=b'[{"sensor": 1}]') == 422
    login = b"grant_type=password&username=prometheus-probe&password=not-the-password"
    form = "application/x-www-form-urlencoded"
    assert send(stack, "POST", "/oauth/token", body=login, content_type=form) == 400
    with urllib.request.urlopen(
        f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=5
    ) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def prometheus(stack, gateway_metrics, tmp_path_factory):
    """A real Prometheus scraping the stack's admin port every second, with alerts.yml loaded."""
    directory = tmp_path_factory.mktemp("prometheus")
    with prometheus_server(
        directory, targets=[f"127.0.0.1:{stack.admin_port}"], rule_files=[ALERT_RULES]
    ) as server:
        yield server


# --- the rules, with promtool ---------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    """`promtool check rules` accepts alerts.yml."""
    result = promtool("check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_prometheus_config_finds_the_rules_through_rule_files():
    """`promtool check config` accepts config/prometheus.yml, and its rule_files lead to alerts.yml."""
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"Checking {ALERT_RULES}\n  SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_rule_unit_tests_pass():
    """Every test in alerts_test.yml passes under `promtool test rules`."""
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _cases(tests: dict[str, Any], alertname: str) -> list[dict[str, Any]]:
    return [
        c
        for t in tests["tests"]
        for c in t.get("alert_rule_test", [])
        if c["alertname"] == alertname
    ]


def _raise_severity(tests: dict[str, Any]) -> str:
    firing = next(c for c in _cases(tests, "GatewayDown") if c["exp_alerts"])
    firing["exp_alerts"][0]["exp_labels"]["severity"] = "warning"
    return "GatewayDown"


def _expect_the_quiet_pattern_to_fire(tests: dict[str, Any]) -> str:
    cases = _cases(tests, "GatewayLoginBruteForce")
    firing = next(c for c in cases if c["exp_alerts"])
    quiet = next(c for c in cases if not c["exp_alerts"])
    quiet["exp_alerts"] = firing["exp_alerts"]
    return "GatewayLoginBruteForce"


def _change_a_recorded_value(tests: dict[str, Any]) -> str:
    case = next(c for t in tests["tests"] for c in t.get("promql_expr_test", []))
    case["exp_samples"][0]["value"] += 1
    return case["expr"]


@pytest.mark.parametrize(
    "break_expectation",
    [_raise_severity, _expect_the_quiet_pattern_to_fire, _change_a_recorded_value],
    ids=["wrong severity", "quiet pattern expected to fire", "wrong recorded value"],
)
def test_a_broken_expectation_fails_the_rule_tests(tmp_path, break_expectation):
    """A copy of alerts_test.yml with one wrong expectation makes `promtool test rules` fail and name the rule."""
    shutil.copy(ALERT_RULES, tmp_path / ALERT_RULES.name)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    rule = break_expectation(tests)
    broken = tmp_path / RULE_TESTS.name
    broken.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(broken))
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout + result.stderr
    assert rule in result.stdout + result.stderr


def test_every_alert_is_complete_and_tested_both_ways():
    """Each alert has a `for`, a severity, a summary, a description and its runbook anchor; each is
    tested firing and quiet; each recording rule's value is tested."""
    rules = load_rules()
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired, quiet = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    tested_records = {c["expr"] for t in tests["tests"] for c in t.get("promql_expr_test", [])}
    alerts = [rule for rule in rules if "alert" in rule]
    for alert in alerts:
        name = alert["alert"]
        assert "for" in alert, name
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert set(alert["annotations"]) == {"summary", "description", "runbook"}, name
        assert alert["annotations"]["runbook"] == f"docs/observability.md#{name.lower()}"
    names = {alert["alert"] for alert in alerts}
    assert names - fired == set(), "alerts with no test that fires them"
    assert names - quiet == set(), "alerts with no test of a normal pattern"
    assert recorded_names() - tested_records == set(), "recording rules with no value test"


# --- the gateway's metrics ------------------------------------------------------------------


def test_gateway_metrics_pass_promtool_lint(gateway_metrics):
    """The gateway's /metrics, labelled series included, has no problem under `promtool check metrics`."""
    for name, labels in (
        ("gateway_requests_total", {"route": "tickets.list", "decision": "allow"}),
        ("gateway_policy_denials_total", {"route": "tickets.create"}),
        ("gateway_auth_events_total", {"event": "auth.login", "outcome": "failure"}),
        ("gateway_ingest_records_total", {"stream": "readings", "outcome": "rejected"}),
    ):
        found = series_labels(gateway_metrics, name)
        assert any(labels.items() <= series.items() for series in found), (name, labels, found)
    result = promtool("check", "metrics", stdin=gateway_metrics)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == "", "promtool reported lint problems"


def test_rules_read_only_metrics_the_gateway_exports(gateway_metrics):
    """Every metric an alert or recording rule reads is in /metrics (or is `up`)."""
    known = exposed_names(gateway_metrics) | recorded_names() | NOT_FROM_THE_GATEWAY
    for rule in load_rules():
        names = metric_names_in(rule["expr"])
        assert names, rule["expr"]
        assert names <= known, (rule.get("alert") or rule.get("record"), names - known)


# --- the dashboard --------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard():
    """The dashboard is JSON with schemaVersion >= 36, a DS_PROMETHEUS input that every panel uses, and unique panel ids."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert {
        "name": "DS_PROMETHEUS",
        "type": "datasource",
        "pluginId": "prometheus",
    }.items() <= dashboard["__inputs"][0].items()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(target["datasource"] == datasource for target in panel["targets"])


def test_dashboard_queries_read_only_existing_metrics(gateway_metrics):
    """Every panel query reads only metric names in the gateway's /metrics or in the recording rules."""
    known = exposed_names(gateway_metrics) | recorded_names()
    targets = dashboard_targets()
    assert len(targets) >= 15
    for title, expr in targets:
        names = metric_names_in(expr)
        assert names, (title, expr)
        assert names <= known, (title, names - known)


def test_metric_names_in_skips_functions_labels_and_operators():
    """The name reader the two tests above rely on finds metrics, not functions, labels or keywords."""
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"x|y"}[$__rate_interval])))'
        " > 4 * (b offset 5m or ns:c:rate5m * 0) and on (job) up"
    )
    assert metric_names_in(expr) == {"a_bucket", "b", "ns:c:rate5m", "up"}


# --- a real Prometheus ----------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway(prometheus, stack):
    """Prometheus finds the gateway's admin port up and stores gateway_requests_total under job gateway."""

    def target_up():
        targets = prometheus.api("targets")["data"]["activeTargets"]
        return [t for t in targets if t["health"] == "up"]

    (target,) = wait_until(target_up, what="the gateway target is up")
    assert target["labels"]["job"] == "gateway"
    assert target["scrapeUrl"] == f"http://127.0.0.1:{stack.admin_port}/metrics"

    answer = prometheus.api("query", query="gateway_requests_total")
    assert answer["status"] == "success"
    decisions = {series["metric"]["decision"] for series in answer["data"]["result"]}
    assert {"allow", "deny"} <= decisions


def test_prometheus_loads_and_evaluates_every_rule(prometheus):
    """Both rule groups load, every rule evaluates against the live gateway without error, and the hourly views are recorded."""

    def all_evaluated():
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return groups if rules and all(rule["health"] == "ok" for rule in rules) else None

    groups = wait_until(all_evaluated, what="every rule evaluated")
    assert {group["name"] for group in groups} == RULE_GROUPS
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule.get("alert") or rule.get("record") for rule in load_rules()}
    for group in groups:
        for rule in group["rules"]:
            assert rule.get("lastError", "") == "", (rule["name"], rule["lastError"])

    def recorded():
        query = (
            "job_route_reason_id:gateway_rbac_denials:increase1h"
            '{route="tickets.create",reason_id="authz.denied"}'
        )
        return prometheus.api("query", query=query)["data"]["result"]

    (series,) = wait_until(recorded, what="RBAC denials per hour recorded")
    assert series["metric"] == {
        "__name__": "job_route_reason_id:gateway_rbac_denials:increase1h",
        "job": "gateway",
        "route": "tickets.create",
        "reason_id": "authz.denied",
    }


def test_every_dashboard_query_runs_on_prometheus(prometheus):
    """Each panel query, with Grafana's $__rate_interval as 1m, is valid PromQL that Prometheus answers."""
    for title, expr in dashboard_targets():
        answer = prometheus.api("query", query=expr.replace("$__rate_interval", "1m"))
        assert answer["status"] == "success", (title, answer.get("error"))
