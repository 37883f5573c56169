"""Every Prometheus metric of the gateway, defined in one place.

Label values come from closed sets (route names, reason ids, status codes), never from
request data, so a client cannot blow up the series count.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.pipeline import RequestContext
    from gateway.secrets.inventory import SecretState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EVAL_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.05)


# Set by `serve --workers N` for each worker before it starts (gateway/workers.py); when set,
# prometheus_client keeps every value in files there, and /metrics adds them up.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body and content type: this process's, or every worker's added up."""
    if MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


class GatewayMetrics:
    """The metric families, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by route, status and decision",
            ["route", "status", "decision"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "gateway_request_duration_seconds", "Time from request in to response out",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.denials = Counter(
            "gateway_denials", "Refused requests by reason id and route",
            ["reason_id", "route"], registry=r,
        )  # fmt: skip
        self.authn_failures = Counter(
            "gateway_authn_failures", "Failed authentications by reason id", ["reason_id"],
            registry=r,
        )  # fmt: skip
        self.policy_denials = Counter(
            "gateway_policy_denials", "Policy denials by route", ["route"], registry=r
        )
        self.validation_failures = Counter(
            "gateway_validation_failures", "Validation failures by route and reason id",
            ["route", "reason_id"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by reason id", ["reason_id"], registry=r
        )
        self.policy_eval = Histogram(
            "gateway_policy_eval_seconds", "Policy evaluation time", buckets=_EVAL_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.policy_decisions = Counter(
            "gateway_policy_decisions", "Policy decisions, by whether the memo answered",
            ["memoised"], registry=r,
        )  # fmt: skip
        self.signing_key_age = Gauge(
            "gateway_signing_key_age_seconds", "Age of the built-in issuer's active signing key",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.auth_events = Counter(
            "gateway_auth_events", "Authentication events by kind and outcome",
            ["event", "outcome"], registry=r,
        )  # fmt: skip
        self.lockouts = Counter(
            "gateway_login_lockouts", "Brute-force lockouts begun (an account/IP limit exhausted)",
            registry=r,
        )  # fmt: skip
        self.would_deny = Counter(
            "gateway_policy_would_deny", "Denials not enforced (dry-run), by route", ["route"],
            registry=r,
        )  # fmt: skip
        self.policy_reloads = Counter(
            "gateway_policy_reloads", "Policy reloads by outcome (accepted, rejected)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.ingest_records = Counter(
            "gateway_ingest_records",
            "Ingest records by stream and outcome (accepted, quarantined, rejected, not_stored)",
            ["stream", "outcome"], registry=r,
        )  # fmt: skip
        self.records_rejected = Counter(
            "gateway_records_rejected", "Rejected ingest records by stream and rule",
            ["stream", "rule"], registry=r,
        )  # fmt: skip
        self.records_quarantined = Counter(
            "gateway_records_quarantined", "Quarantined ingest records by stream and rule",
            ["stream", "rule"], registry=r,
        )  # fmt: skip
        # The audit trail and its shipping to the SIEM (docs/observability.md).
        self.audit_backlog = Gauge(
            "gateway_audit_backlog", "Audit events written as JSON lines but not yet in DuckDB",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.siem_backlog = Gauge(
            "gateway_siem_backlog",
            "Audit events not yet delivered to the SIEM (in memory and spooled to disk)",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.siem_up = Gauge(
            "gateway_siem_up",
            "1 when the SIEM connection is up, 0 when it is not",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.siem_delivery_failures = Counter(
            "gateway_siem_delivery_failures",
            "Failed attempts to deliver audit events to the SIEM (connect, TLS or write errors)",
            registry=r,
        )  # fmt: skip
        self.activity_anomalies = Counter(
            "gateway_activity_anomalies",
            "Unusual activity found by the anomaly job, by entity type (subject, remote_addr) "
            "and feature", ["entity_type", "feature"], registry=r,
        )  # fmt: skip
        # Secrets (gateway/secrets/inventory.py): names come from config, never from requests.
        self.secret_age = Gauge(
            "gateway_secret_age_seconds", "Age of each secret the gateway holds (`secrets check`)",
            ["secret"], multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.secret_max_age = Gauge(
            "gateway_secret_max_age_seconds", "Each secret's age limit from config (secrets.*)",
            ["secret"], multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.certificate_expiry = Gauge(
            "gateway_certificate_expiry_timestamp_seconds",
            "When each certificate the gateway uses stops being valid (Unix time)",
            ["certificate"], multiprocess_mode="livemin", registry=r,
        )  # fmt: skip
        self.secrets_failing = Gauge(
            "gateway_secrets_failing",
            "Secrets overdue, expiring, expired, missing or unreadable (`secrets check` exits 1)",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.tls_enabled = Gauge(
            "gateway_tls_enabled",
            "1 when the API listens with TLS; 0 when started with --allow-plaintext",
            multiprocess_mode="livemin", registry=r,
        )  # fmt: skip
        self.tls_enabled.set(1)
        # The console's CSP reports (gateway/console/reports.py): labels from closed sets.
        self.csp_violations = Counter(
            "gateway_csp_violations",
            "CSP violations browsers reported on console pages, by directive and disposition "
            "(enforce: blocked; report: report-only)", ["directive", "disposition"], registry=r,
        )  # fmt: skip
        self.csp_reports_dropped = Counter(
            "gateway_csp_reports_dropped",
            "CSP report bodies dropped unread: their address sent more than console.report_limit",
            registry=r,
        )  # fmt: skip
        # Retention (gateway/archive/): table names from a closed set in gateway/archive/job.py.
        self.archive_rows = Counter(
            "gateway_archive_rows",
            "Rows archived to verified Parquet and then deleted, by table", ["table"], registry=r,
        )  # fmt: skip
        self.archive_runs = Counter(
            "gateway_archive_runs", "Archival runs by outcome (completed, failed)", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.archive_last_success = Gauge(
            "gateway_archive_last_success_timestamp_seconds",
            "When the last archival run in which no table failed ended (Unix time)",
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        for outcome in ("completed", "failed"):  # a first failure is then an increase
            self.archive_runs.labels(outcome)
        for outcome in ("accepted", "rejected"):  # both series exist from the start: the
            self.policy_reloads.labels(outcome)  # first rejected reload is then an increase
        self.policy_info = Gauge(
            "gateway_policy_revision_info",
            "The loaded policy revision",
            ["revision"],
            multiprocess_mode="livemax",
            registry=r,
        )

    def watch(self, gauge: Gauge, value: Callable[[], float]) -> None:
        """Let `gauge` show `value()`.

        Read at each scrape; with several workers (values in files) written by `sample()`.
        """
        if MULTIPROCESS_DIR:
            self._watched.append((gauge, value))
        else:
            gauge.set_function(value)

    def sample(self) -> None:
        """Write the watched gauges' current values (multiprocess mode)."""
        for gauge, value in self._watched:
            gauge.set(value())

    def set_policy_revision(self, revision: str) -> None:
        """1 for the loaded revision; earlier ones go (with workers, to 0: files keep them)."""
        if MULTIPROCESS_DIR:
            for labels in list(self.policy_info._metrics):  # noqa: SLF001 - the set label values
                self.policy_info.labels(*labels).set(0)
        else:
            self.policy_info.clear()
        self.policy_info.labels(revision).set(1)

    def observe_archive(self, outcome: str, rows: dict[str, int], finished_at: float) -> None:
        """An archival run: its outcome, rows by table, and (if nothing failed) when it ended."""
        self.archive_runs.labels(outcome).inc()
        for table, count in rows.items():
            if count:
                self.archive_rows.labels(table).inc(count)
        if outcome == "completed":
            self.archive_last_success.set(finished_at)

    def observe_request(self, ctx: RequestContext) -> None:
        """The pipeline observer: the request counters and histograms."""
        route = ctx.route_name
        if "would_deny" in ctx.detail:
            self._child(self.would_deny, route).inc()
        if ctx.event.startswith("auth."):
            outcome = "failure" if ctx.reason_id else "success"
            self._child(self.auth_events, ctx.event, outcome).inc()
            if ctx.detail.get("lockout"):
                self.lockouts.inc()
        summary = ctx.detail.get("validation")
        if summary is not None:
            self.observe_records(summary, stored=not ctx.reason_id)
        csp = ctx.detail.get("csp")
        if csp is not None:
            self.observe_csp(csp)
        self._child(self.latency, route).observe(ctx.elapsed_ms / 1000.0)
        if ctx.decision is not None:
            self.policy_eval.observe(ctx.decision.eval_us / 1e6)
            self._child(self.policy_decisions, "true" if ctx.decision.memoised else "false").inc()
        if not ctx.reason_id:
            self._child(self.requests, route, str(ctx.status), "allow").inc()
            return
        self.observe_refusal(route, ctx.status, ctx.reason_id)

    def observe_csp(self, csp: dict[str, Any]) -> None:
        """Count the CSP reports of one POST /console/csp-report (or its dropping)."""
        if csp.get("dropped"):
            self.csp_reports_dropped.inc()
        for violation in csp.get("violations", ()):
            self._child(self.csp_violations, violation["directive"], violation["disposition"]).inc()

    def observe_records(self, summary: dict[str, Any], *, stored: bool) -> None:
        """Count a batch's records by outcome and rule (validate stage's summary)."""
        # Listed streams come from config; a client-chosen name must not make a new series.
        stream = summary["stream"] if summary["listed"] else "_unlisted"
        counts = {"rejected": summary["rejected"]}
        if stored:
            counts |= {"accepted": summary["accepted"], "quarantined": summary["quarantined"]}
        else:
            counts["not_stored"] = summary["received"] - summary["rejected"]
        for outcome, count in counts.items():
            if count:
                self._child(self.ingest_records, stream, outcome).inc(count)
        rules = summary["rules"]
        for rule, count in rules.get("rejected", {}).items():
            self._child(self.records_rejected, stream, rule).inc(count)
        if stored:
            for rule, count in rules.get("quarantined", {}).items():
                self._child(self.records_quarantined, stream, rule).inc(count)

    def _child(self, family: Any, *labels: str) -> Any:
        # labels() takes a lock and builds a key on every call; the label sets are closed
        # (routes, statuses, reason ids), so their children are kept once looked up.
        key = (id(family), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def observe_refusal(self, route: str, status: int, reason: str) -> None:
        """Count one refused request under its reason id and family."""
        self._child(self.requests, route, str(status), "deny").inc()
        self._child(self.denials, reason, route).inc()
        family = reason.partition(".")[0]
        if family == "authn":
            self._child(self.authn_failures, reason).inc()
        elif reason == "authz.denied":
            self._child(self.policy_denials, route).inc()
        elif family == "validation":
            self._child(self.validation_failures, route, reason).inc()
        elif family == "upstream":
            self._child(self.upstream_errors, reason).inc()

    def observe_secrets(self, states: list[SecretState]) -> None:
        """Set the secret-age and certificate-expiry gauges from a fresh inventory.

        One process drops the series of secrets that are gone; with several workers the
        files keep them until the next start (prometheus_client cannot clear there).
        """
        if not MULTIPROCESS_DIR:
            self.secret_age.clear()
            self.secret_max_age.clear()
            self.certificate_expiry.clear()
        for state in states:
            if state.expires_at is not None:
                self.certificate_expiry.labels(state.name).set(state.expires_at)
            elif state.age_seconds is not None:
                self.secret_age.labels(state.name).set(state.age_seconds)
                if state.max_age_seconds is not None:
                    self.secret_max_age.labels(state.name).set(state.max_age_seconds)
        self.secrets_failing.set(sum(state.failing for state in states))
