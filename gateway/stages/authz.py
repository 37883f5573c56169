"""Authorization: ask the policy about the normalised request; fail closed on any doubt.

The input document carries an allow-listed subset of headers: Authorization and cookies never
enter it, so no policy (or decision log) can see a credential.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from gateway.pipeline import Denial, RequestContext
from gateway.policy import PolicyError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from gateway.policy import PolicyEngine
    from gateway.policy.decisionlog import DecisionLog

log = structlog.get_logger("gateway.authz")

# Every value in the input costs a foreign call in regopy (~5 us each, measured): the input
# carries what a policy can use, not everything known. X-Forwarded-For is left out on purpose:
# a client sets it freely, so no policy may trust it.
POLICY_HEADERS = ("content-type",)
# Claims beyond sub/iss/amr (which have their own fields) that attribute rules may use.
POLICY_CLAIMS = ("aud", "scope", "department_id", "email", "client_id")


def policy_input(ctx: RequestContext) -> dict[str, Any]:
    """The input document of DESIGN.md, built from what earlier stages established."""
    principal = ctx.principal
    route = ctx.route
    headers = ctx.request.headers
    query = ctx.query
    return {
        "subject": {
            "sub": principal.sub if principal else None,
            "roles": list(principal.roles) if principal else [],
            "iss": principal.issuer if principal else None,
            "amr": list(principal.amr) if principal else [],
            "claims": _safe_claims(principal.claims) if principal else {},
        },
        "request": {
            "method": ctx.request.method,
            "path": ctx.path,
            "segments": list(ctx.segments),
            "query": {k: query.getall(k) for k in query} if query else {},
            "headers": {h: headers[h] for h in POLICY_HEADERS if h in headers},
            "remote_addr": ctx.request.remote,
        },
        "route": {
            "name": route.name if route else None,
            "resource": route.resource if route else None,
            "action": route.action if route else None,
            "params": ctx.params,
        },
        "time": {"now": _rfc3339(int(ctx.wall_time))},
    }


@functools.lru_cache(maxsize=4)
def _rfc3339(second: int) -> str:
    # Formatted once per second rather than once per request.
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _safe_claims(claims: dict[str, Any]) -> dict[str, Any]:
    # The raw token itself never travels, and neither do claims no rule reads.
    return {k: claims[k] for k in POLICY_CLAIMS if k in claims}


class AuthzStage:
    """Sets ctx.decision; denies authz.denied, or authz.engine_error when the engine fails.

    A deny in dry-run (the whole policy, a route, or the decision's own `dry_run`) lets the
    request go on, marked "would deny" in the audit event, the log and a metric. Engine errors
    are never dry-run: a broken policy fails closed whatever the mode.
    """

    name = "authz"

    def __init__(
        self,
        engine: Callable[[], PolicyEngine],
        *,
        budget_ms: float,
        dry_run: bool = False,
        dry_run_routes: Iterable[str] = (),
        explain: bool = False,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self._engine = engine  # a getter, so a reload swaps the engine without touching stages
        self._budget_s = budget_ms / 1000.0
        self._dry_run = dry_run
        self._dry_run_routes = frozenset(dry_run_routes)
        self._explain = explain  # development: the client sees the policy's reasons
        self._log = decision_log

    async def __call__(self, ctx: RequestContext) -> None:
        """Evaluate on the loop (a thread hop costs more than the evaluation)."""
        started = time.perf_counter()
        document = policy_input(ctx)
        engine = self._engine()
        # A remote engine answers over the network: awaited, never called on the loop.
        decide_async = getattr(engine, "decide_async", None)
        try:
            if decide_async is None:
                decision = engine.decide(document)
            else:
                decision = await decide_async(document)
        except PolicyError as exc:
            log.error("authz.engine_error", request_id=ctx.request_id, error=str(exc))  # noqa: TRY400 - the message is the point, a traceback adds nothing
            raise Denial("authz.engine_error", "the authorization decision failed") from None
        if time.perf_counter() - started > self._budget_s:
            # Evaluation cannot be interrupted, but an answer past its budget is not trusted.
            raise Denial("authz.engine_error", "the authorization decision timed out")
        ctx.decision = decision
        dry_run = self._dry_run or decision.dry_run or ctx.route_name in self._dry_run_routes
        if self._log is not None:
            self._log.record(
                decision_id=ctx.request_id, document=document, decision=decision,
                wall_time=ctx.wall_time, route=ctx.route_name, dry_run=dry_run,
            )  # fmt: skip
        if decision.allow:
            return
        if dry_run:
            ctx.detail["would_deny"] = list(decision.reasons)
            log.warning("authz.would_deny", request_id=ctx.request_id, route=ctx.route_name,
                        reasons=list(decision.reasons))  # fmt: skip
            return
        if self._explain:
            raise Denial(
                "authz.denied", "the policy denies this request", reasons=list(decision.reasons)
            )
        raise Denial("authz.denied", "the policy denies this request")
