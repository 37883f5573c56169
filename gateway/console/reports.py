"""POST /console/csp-report: where browsers report what the console's CSP blocked (or would).

Needs no credential (a browser posts reports by itself, without our CSRF token), so it is
bounded instead: a size limit, a rate per client address, at most 20 reports a body. A report
is reduced to closed-set facts (the directive, the disposition, what kind of thing was blocked,
which console page): no URL, sample or policy text from a report is ever kept or echoed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import limits
from aiohttp import web
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from gateway.console.csp import DIRECTIVES, REPORT_PATH
from gateway.identity.sessions import origin_of
from gateway.pipeline import Denial
from gateway.routes import Route, RouteTable, compile_path
from gateway.stages.normalize import NormalizeStage
from gateway.stages.route import RouteStage
from gateway.stages.validate import parse_json

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gateway.config import ConsoleConfig
    from gateway.pipeline import RequestContext, Stage

CSP_REPORT = "application/csp-report"  # report-uri (CSP Level 2)
REPORTS_JSON = "application/reports+json"  # the Reporting API (report-to)
CONTENT_TYPES = (CSP_REPORT, REPORTS_JSON, "application/json")
MAX_REPORTS = 20  # per body; the Reporting API batches, a flood does not get further
_KEYWORDS = frozenset({"inline", "eval", "wasm-eval", "trusted-types-policy", "trusted-types-sink"})

REPORT_ROUTE = Route(
    name="console.csp_report",
    methods=frozenset({"POST"}),
    path=REPORT_PATH,
    resource="console",
    action="report",
    pattern=compile_path(REPORT_PATH),
    content_types=CONTENT_TYPES,
)


def report_stages(
    config: ConsoleConfig, *, allowed_origins: Iterable[str], pages: Iterable[str]
) -> list[Stage]:
    """The report endpoint's own pipeline: normalize -> route -> read the reports (no authn)."""
    return [
        NormalizeStage(),
        RouteStage(RouteTable([REPORT_ROUTE])),
        CspReportStage(
            max_bytes=config.report_max_bytes, limit=config.report_limit,
            allowed_origins=allowed_origins, pages=pages,
        ),
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Violation:
    """One report, reduced to what may be counted and audited."""

    directive: str  # a name from csp.DIRECTIVES, or "other"
    disposition: str  # "enforce" (blocked) or "report" (report-only); "other" if neither
    blocked: str  # inline, eval, data, blob, same-origin, cross-origin, other, ...
    page: str  # the console path the report came from, or "other"


class CspReportStage:
    """Reads the reports of one POST, sets the audit detail, answers 204."""

    name = "csp_report"

    def __init__(
        self,
        *,
        max_bytes: int,
        limit: str,
        allowed_origins: Iterable[str],
        pages: Iterable[str],
    ) -> None:
        self._max_bytes = max_bytes
        self._limit = limits.parse(limit)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._origins = frozenset(allowed_origins)
        self._pages = frozenset(pages)

    async def __call__(self, ctx: RequestContext) -> None:
        """Record the reports (or drop them when this address sends too many)."""
        headers = {"Cache-Control": "no-store", "X-Request-Id": ctx.request_id}
        ctx.response = web.Response(status=204, headers=headers)
        if not await self._limiter.hit(self._limit, ctx.request.remote or "-"):
            ctx.detail["csp"] = {"dropped": "rate_limited"}
            return
        content_type = ctx.request.content_type
        if content_type not in CONTENT_TYPES:
            raise Denial(
                "validation.content_type",
                f"content type {content_type!r} is not accepted; use one of {list(CONTENT_TYPES)}",
            )
        body = await ctx.read_body(self._max_bytes)
        try:
            document = parse_json(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise Denial("validation.malformed_json", "the report is not JSON") from None
        reports = _report_bodies(document)
        violations = [self._violation(report) for report in reports[:MAX_REPORTS]]
        ctx.detail["csp"] = {
            "violations": [asdict(v) for v in violations],
            "ignored": len(reports) - len(violations) + _others(document),
        }
        if violations:
            ctx.event = "csp.violation"

    def _violation(self, report: dict[str, Any]) -> Violation:
        directive = _text(report, "effective-directive", "effectiveDirective")
        if not directive:  # CSP Level 2 browsers: "script-src 'nonce-...'" in violated-directive
            directive = _text(report, "violated-directive").split(" ")[0]
        disposition = _text(report, "disposition")
        return Violation(
            directive=directive if directive in DIRECTIVES else "other",
            disposition=disposition if disposition in {"enforce", "report"} else "other",
            blocked=self._blocked(_text(report, "blocked-uri", "blockedURL")),
            page=self._page(_text(report, "document-uri", "documentURL")),
        )

    def _blocked(self, uri: str) -> str:
        if uri in _KEYWORDS:
            return uri
        scheme = uri.partition(":")[0]
        if scheme in {"data", "blob"}:
            return scheme
        if scheme in {"http", "https"}:
            return "same-origin" if origin_of(uri) in self._origins else "cross-origin"
        return "other"

    def _page(self, uri: str) -> str:
        try:
            path = urlsplit(uri).path
        except ValueError:
            return "other"
        return path if path in self._pages else "other"


def _report_bodies(document: Any) -> list[dict[str, Any]]:
    """The CSP reports in a body of either format; a body of neither shape is refused."""
    if isinstance(document, dict) and isinstance(document.get("csp-report"), dict):
        return [document["csp-report"]]
    if isinstance(document, list):
        return [
            item["body"]
            for item in document
            if isinstance(item, dict)
            and item.get("type") == "csp-violation"
            and isinstance(item.get("body"), dict)
        ]
    raise Denial(
        "validation.schema",
        'a report is {"csp-report": {...}} or a Reporting API list of reports',
        pointer="",
    )


def _others(document: Any) -> int:
    """Reports of other types in a Reporting API body (deprecations, interventions)."""
    if not isinstance(document, list):
        return 0
    return sum(
        1
        for item in document
        if not (isinstance(item, dict) and item.get("type") == "csp-violation")
    )


def _text(report: dict[str, Any], *names: str) -> str:
    for name in names:
        value = report.get(name)
        if isinstance(value, str):
            return value[:2048].strip()
    return ""
