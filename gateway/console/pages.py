"""The console's handlers, one per `console.*` route in config/routes.toml (served_by gateway).

Each runs after authentication, route matching, the policy and validation, like every route;
the pages only read (the audit store, the policy's state, the secrets inventory, the upstream's
quarantine). The one action, a quarantine review, is done by the upstream as the signed-in
user and audited as `console.quarantine_review`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDict

from gateway.auditsearch import parse_search
from gateway.console.csp import ContentSecurityPolicy
from gateway.console.events import as_text, event_view
from gateway.console.quarantine import STATUSES, QuarantineClient, UpstreamCallError, masked_record
from gateway.console.render import PageRenderer, load_asset
from gateway.pipeline import Denial
from gateway.secrets.inventory import DAY, inventory

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import aiohttp

    from gateway.app import GatewayState
    from gateway.pipeline import RequestContext
    from gateway.secrets.inventory import SecretState

    Handler = Callable[[RequestContext], Awaitable[web.StreamResponse]]
    Page = tuple[list[dict[str, Any]], str | None]  # events, next cursor
    Search = Callable[[dict[str, Any]], Awaitable[Page]]

# The pages a CSP report may name (anything else is counted as "other").
PAGES = ("/console", "/console/audit", "/console/policy", "/console/quarantine", "/console/secrets")
_FILTERS = ("subject", "decision", "reason_id", "route", "kind", "since", "until")
_AUDIT_PARAMS = frozenset({*_FILTERS, "cursor", "limit"})
_MAX_LIMIT = 500
# Ages are shown in days: a few seconds' staleness cannot matter, a rotation shows at once after.
_INVENTORY_SECONDS = 5.0


def _only(ctx: RequestContext, names: frozenset[str]) -> MultiDict[str]:
    """The query's non-empty parameters (an empty form field means "any"); others refused."""
    query: MultiDict[str] = ctx.query if ctx.query is not None else MultiDict()
    unknown = sorted(set(query) - names)
    if unknown:
        raise Denial("request.bad_query", f"unknown parameter {unknown[0]!r}; use {sorted(names)}")
    return MultiDict((name, value) for name, value in query.items() if value.strip())


def _when(epoch: float | None) -> str:
    if not epoch:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class Console:
    """The console's pages over the gateway's running state."""

    def __init__(
        self, state: GatewayState, *, upstream: aiohttp.ClientSession, search: Search
    ) -> None:
        self._state = state
        self._search = search
        config = state.config
        self._render = PageRenderer(
            ContentSecurityPolicy(config.console.csp_mode),
            load_asset("console.js", "text/javascript"),
        )
        self._quarantine = QuarantineClient(
            upstream, base_url=config.upstream.url, secret=state.upstream_secret.current
        )
        self._secrets: tuple[float, list[SecretState]] = (0.0, [])
        self._secrets_read = -math.inf

    def handlers(self) -> dict[str, Handler]:
        """Route name -> handler, for the local stage."""
        return {
            "console.home": self.home,
            "console.audit": self.audit,
            "console.policy": self.policy,
            "console.quarantine": self.quarantine,
            "console.quarantine.review": self.review,
            "console.secrets": self.secrets,
            "console.static": self.static,
        }

    async def home(self, ctx: RequestContext) -> web.Response:
        """/console: the audit page is the console's front page."""
        return web.Response(
            status=303,
            headers={"Location": "/console/audit", "Cache-Control": "no-store",
                     "X-Request-Id": ctx.request_id},
        )  # fmt: skip

    async def static(self, ctx: RequestContext) -> web.Response:
        """The console's one script (its SRI hash is in every page)."""
        return self._render.asset(ctx)

    async def audit(self, ctx: RequestContext) -> web.Response:
        """Recent audit events, newest first, filtered like GET /admin/audit."""
        given = _only(ctx, _AUDIT_PARAMS)
        if "limit" not in given:
            given["limit"] = str(self._state.config.console.page_size)
        search = parse_search(given)
        if search["limit"] > _MAX_LIMIT:
            raise Denial("request.bad_query", f"limit must be from 1 to {_MAX_LIMIT} here")
        items, following = await self._search(search)
        next_url = None
        if following is not None:
            kept = [(k, v) for k, v in given.items() if k != "cursor"]
            next_url = "/console/audit?" + urlencode([*kept, ("cursor", following)])
        # ~40 us an event (the raw JSON above all): a page of them is too much for the loop.
        events = await asyncio.to_thread(lambda: [event_view(item) for item in items])
        return await self._render.page(
            ctx, "audit.html", title="Audit events", csrf=await self._csrf(ctx),
            events=events, next_url=next_url,
            filters={name: given.get(name, "") for name in _FILTERS}, limit=search["limit"],
        )  # fmt: skip

    async def policy(self, ctx: RequestContext) -> web.Response:
        """The policy in force: revision, reloads, enforcement mode and dry-run routes."""
        _only(ctx, frozenset())
        state = self._state
        config = state.config.policy
        status = state.reloader.status if state.reloader is not None else None
        reloads: list[dict[str, Any]] = []
        for kind in ("policy.reloaded", "policy.reload_rejected"):
            items, _ = await self._search(parse_search(MultiDict(kind=kind, limit="5")))
            reloads.extend(items)
        reloads.sort(key=lambda event: str(event.get("time")), reverse=True)
        routes = [
            {"name": route.name, "methods": " ".join(sorted(route.methods)), "path": route.path,
             "resource": route.resource, "action": route.action, "served_by": route.served_by,
             "dry_run": config.mode == "dry-run" or route.name in config.dry_run_routes}
            for route in state.routes.routes
        ]  # fmt: skip
        return await self._render.page(
            ctx, "policy.html", title="Policy", csrf=await self._csrf(ctx),
            engine=config.engine, revision=state.engine.revision, entrypoint=config.entrypoint,
            mode=config.mode, dry_run_routes=list(config.dry_run_routes),
            budget_ms=config.eval_budget_ms, watch=config.watch,
            last_attempt=_when(status.last_attempt) if status else "",
            last_error=status.last_error if status else None,
            rejected_revision=status.rejected_revision if status else None,
            reloads=[{**{k: as_text(e.get(k)) for k in ("time", "kind", "subject")},
                      "detail": as_text(e.get("detail"))} for e in reloads[:10]],
            routes=routes,
        )  # fmt: skip

    async def quarantine(self, ctx: RequestContext) -> web.Response:
        """A stream's quarantined records, with accept and discard buttons for pending ones."""
        given = _only(ctx, frozenset({"stream", "status"}))
        catalog = self._state.streams.streams
        streams = [s.name for s in catalog.values() if s.statistics or s.model]
        stream = given.get("stream", streams[0] if streams else "")
        if stream and stream not in streams:
            raise Denial("request.bad_query", f"stream must be one of {streams}")
        status = given.get("status", "pending")
        if status not in STATUSES:
            raise Denial("request.bad_query", f"status must be one of {list(STATUSES)}")
        records: list[dict[str, Any]] = []
        error = None
        if stream and ctx.principal is not None:
            records, error = await self._records(ctx, stream, status)
        return await self._render.page(
            ctx, "quarantine.html", title="Quarantine", csrf=await self._csrf(ctx),
            streams=streams, stream=stream, status=status, statuses=STATUSES,
            records=records, error=error,
        )  # fmt: skip

    async def _records(
        self, ctx: RequestContext, stream: str, status: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        assert ctx.principal is not None  # noqa: S101 - checked by the caller
        try:
            code, document = await self._quarantine.records(
                stream, status, 100, actor=ctx.principal, request_id=ctx.request_id
            )
        except UpstreamCallError as exc:
            return [], f"the EMP service did not answer ({exc})"
        if code != 200:  # noqa: PLR2004 - HTTP OK
            return [], f"the EMP service answered {code}: {as_text(document.get('error'))}"
        spec = self._state.streams.streams.get(stream)
        views = []
        for item in document.get("items") or []:
            record = masked_record(item.get("record"), spec)
            views.append({
                **{k: as_text(item.get(k)) for k in (
                    "id", "received_at", "received_by", "score", "model", "flags", "status",
                    "reviewed_by", "reviewed_at", "review_note")},
                "record": json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False),
                "pending": item.get("status") == "pending",
            })  # fmt: skip
        return views, None

    async def review(self, ctx: RequestContext) -> web.Response:
        """Accept or discard one quarantined record, as the signed-in user; audited."""
        assert ctx.principal is not None  # noqa: S101 - authn ran before any handler
        ctx.event = "console.quarantine_review"
        stream, item_id, decision = ctx.params["stream"], ctx.params["id"], ctx.params["decision"]
        payload = ctx.payload if isinstance(ctx.payload, dict) else {}
        ctx.detail["review"] = {"stream": stream, "id": int(item_id), "decision": decision}
        try:
            code, document = await self._quarantine.review(
                stream, item_id, decision, payload.get("note"),
                actor=ctx.principal, request_id=ctx.request_id,
            )  # fmt: skip
        except UpstreamCallError:
            raise Denial("upstream.unavailable", "the EMP service did not answer") from None
        if code >= 500:  # noqa: PLR2004 - the upstream failed, not the request
            raise Denial("upstream.unavailable", f"the EMP service answered {code}")
        ctx.detail["review"]["upstream_status"] = code
        headers = {"Cache-Control": "no-store", "X-Request-Id": ctx.request_id}
        return web.json_response(document, status=code, headers=headers)

    async def secrets(self, ctx: RequestContext) -> web.Response:
        """Every secret the gateway holds, with its age and limit: never a value."""
        _only(ctx, frozenset())
        read_at, states = await self._inventory()
        return await self._render.page(
            ctx, "secrets.html", title="Keys and secrets", csrf=await self._csrf(ctx),
            secrets=[_secret_view(state) for state in states],
            failing=sum(state.failing for state in states), read_at=_when(read_at),
        )  # fmt: skip

    async def _inventory(self) -> tuple[float, list[SecretState]]:
        """The inventory, read at most every few seconds: it opens the account store (~30 ms)."""
        read_at, states = self._secrets
        if time.monotonic() - self._secrets_read > _INVENTORY_SECONDS:
            states = await asyncio.to_thread(inventory, self._state.config)
            read_at, self._secrets_read = time.time(), time.monotonic()
            self._secrets = (read_at, states)
        return read_at, states

    async def _csrf(self, ctx: RequestContext) -> str:
        """The session's CSRF token, for the page's forms (empty for a bearer-token caller)."""
        identity = self._state.identity
        principal = ctx.principal
        sid = principal.claims.get("sid") if principal is not None else None
        if identity is None or principal is None or principal.claims.get("session") != "cookie":
            return ""
        session = await identity.tokens.session(str(sid))
        return session.csrf if session is not None else ""


def _secret_view(state: SecretState) -> dict[str, Any]:
    def days(seconds: float | None) -> str:
        return "" if seconds is None else f"{seconds / DAY:.1f}"

    return {
        "name": state.name, "kind": state.kind, "source": state.source, "status": state.status,
        "failing": state.failing, "age_days": days(state.age_seconds),
        "max_age_days": days(state.max_age_seconds), "expires": _when(state.expires_at),
        "note": state.note,
    }  # fmt: skip


def disabled_handlers() -> dict[str, Handler]:
    """With console.enabled = false: every console route is 404, as if it did not exist."""

    async def off(_ctx: RequestContext) -> web.Response:
        raise Denial("route.not_found", "the console is off (console.enabled = false)")

    names = ("home", "audit", "policy", "quarantine", "quarantine.review", "secrets", "static")
    return {f"console.{name}": off for name in names}
