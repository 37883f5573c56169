"""The request pipeline: RequestContext, Denial, the Stage protocol and the runner.

Stages only read and set the context or raise Denial; only the runner answers a denial
and emits the one audit event and the request metrics for every request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web

from gateway.reasons import status_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    from multidict import MultiDict

    from gateway.routes import Route

log = structlog.get_logger("gateway.pipeline")


class Denial(Exception):  # noqa: N818 - a denial is an expected outcome, not an "Error"
    """An expected refusal: a stable reason id, its status, and a message safe for the client."""

    def __init__(self, reason_id: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.reason_id = reason_id
        self.status = status_of(reason_id)
        self.message = message
        self.detail = detail
        # A per-record receipt for the client only (the audit event keeps its own summary).
        self.receipt: dict[str, Any] | None = None


def new_request_id() -> str:
    """A gateway-made request id: 128 random bits as hex (uuid4's, without the UUID object)."""
    return os.urandom(16).hex()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by an authenticator."""

    sub: str
    roles: tuple[str, ...]
    issuer: str
    claims: dict[str, Any]
    amr: tuple[str, ...] = ()
    expires_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer, checked for shape, with the revision that produced it."""

    allow: bool
    reasons: tuple[str, ...]
    revision: str
    eval_us: float
    memoised: bool = False
    dry_run: bool = False  # the policy asked for its denials to be reported, not enforced


@dataclass(slots=True)
class RequestContext:
    """Everything a stage may read or set while one request crosses the pipeline."""

    request: web.Request
    request_id: str
    started: float
    wall_time: float
    path: str = ""
    segments: tuple[str, ...] = ()
    query: MultiDict[str] | None = None
    query_string: str = ""
    route: Route | None = None
    params: dict[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    decision: Decision | None = None
    body: bytes | None = None
    payload: Any = None
    upstream_content_type: str | None = None  # set when validation rewrote the body
    response: web.StreamResponse | None = None
    status: int = 0
    reason_id: str = ""
    message: str = ""
    upstream_ms: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    # Detail for the audit store only, kept sealed there and never in the JSON lines, the chain
    # or the SIEM: the values of a route's `sealed` fields (gateway/stages/validate.py).
    sealed_detail: dict[str, Any] = field(default_factory=dict)
    # The audit event's kind: "request", or what a gateway-served endpoint did ("auth.login", ...).
    event: str = "request"
    # Who the request was about before anyone authenticated (the username a login tried).
    attempted: str | None = None

    @classmethod
    def start(cls, request: web.Request) -> RequestContext:
        """A fresh context with a gateway-made request id (client-supplied ids are not trusted)."""
        return cls(
            request=request,
            request_id=new_request_id(),
            started=time.perf_counter(),
            wall_time=time.time(),
        )

    @property
    def route_name(self) -> str:
        """The matched route's name, or '-' before (or without) a match."""
        return self.route.name if self.route is not None else "-"

    @property
    def elapsed_ms(self) -> float:
        """Milliseconds since the request entered the pipeline."""
        return (time.perf_counter() - self.started) * 1000.0

    async def read_body(self, limit: int) -> bytes:
        """Read the request body once, refusing more than `limit` bytes (413)."""
        if self.body is not None:
            return self.body
        declared = self.request.content_length
        if declared is not None and declared > limit:
            raise Denial("request.too_large", f"request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise Denial("request.too_large", f"request body exceeds {limit} bytes")
            chunks.append(chunk)
        self.body = b"".join(chunks)
        return self.body


class Stage(Protocol):
    """One step of the pipeline: returns to go on, or raises Denial."""

    name: str

    async def __call__(self, ctx: RequestContext) -> None:
        """Read and set the context; raise Denial to refuse the request."""


def refusal_response(
    status: int, reason_id: str, message: str, request_id: str, detail: dict[str, Any]
) -> web.Response:
    """The one shape of every refusal: {error, reason_id, request_id} (+ safe detail), no-store."""
    body: dict[str, Any] = {"error": message, "reason_id": reason_id, "request_id": request_id}
    body.update(detail)
    headers = {"X-Request-Id": request_id, "Cache-Control": "no-store"}
    return web.json_response(body, status=status, headers=headers)


def denial_response(ctx: RequestContext, denial: Denial) -> web.Response:
    """A Denial as the client sees it, with the headers its reason calls for."""
    detail = (
        denial.detail if denial.receipt is None else {**denial.detail, "receipt": denial.receipt}
    )
    response = refusal_response(
        denial.status, denial.reason_id, denial.message, ctx.request_id, detail
    )
    headers = response.headers
    if denial.reason_id == "authn.missing_token":
        # RFC 6750 section 3.1: no credentials at all -> no error code, just the challenge.
        headers["WWW-Authenticate"] = 'Bearer realm="emp"'
    elif denial.reason_id.startswith("authn."):
        headers["WWW-Authenticate"] = 'Bearer realm="emp", error="invalid_token"'
    if denial.reason_id == "route.method_not_allowed" and "allow" in denial.detail:
        headers["Allow"] = ", ".join(denial.detail["allow"])
    if "retry_after" in denial.detail:
        headers["Retry-After"] = str(denial.detail["retry_after"])
    return response


DenialRenderer = Callable[[RequestContext, Denial], web.Response]


class Pipeline:
    """Runs stages in order; whatever happens, exactly one observation per request."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        observers: Sequence[Callable[[RequestContext], None]],
        render_denial: DenialRenderer | None = None,
    ) -> None:
        self.stages = tuple(stages)
        self.observers = tuple(observers)
        # How a refusal looks to this pipeline's clients: JSON by default; the token endpoint
        # answers in RFC 6749's shape and the login form in HTML (same reason_id and request_id).
        self.render_denial = render_denial or denial_response

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp handler: run the stages and answer."""
        ctx = RequestContext.start(request)
        try:
            return await self._run(ctx)
        except asyncio.CancelledError:
            # The client went away mid-request: still one audit event, with its own reason.
            ctx.status, ctx.reason_id = status_of("client.disconnected"), "client.disconnected"
            raise
        finally:
            self._observe(ctx)

    async def _run(self, ctx: RequestContext) -> web.StreamResponse:
        try:
            for stage in self.stages:
                await stage(ctx)
        except Denial as denial:
            return self._deny(ctx, denial)
        except Exception:
            log.exception("pipeline.unexpected_error", request_id=ctx.request_id)
            return self._deny(ctx, Denial("internal.error", "internal error"))
        if ctx.response is None:
            log.error("pipeline.no_response", request_id=ctx.request_id, route=ctx.route_name)
            return self._deny(ctx, Denial("internal.error", "internal error"))
        if not ctx.status:
            ctx.status = ctx.response.status
        return ctx.response

    def _deny(self, ctx: RequestContext, denial: Denial) -> web.StreamResponse:
        if ctx.response is not None and ctx.response.prepared:
            # Headers already went out (a stream broke mid-way): record it, keep what was sent.
            ctx.reason_id, ctx.message = denial.reason_id, denial.message
            return ctx.response
        ctx.status, ctx.reason_id, ctx.message = denial.status, denial.reason_id, denial.message
        ctx.detail.update(denial.detail)
        ctx.response = self.render_denial(ctx, denial)
        return ctx.response

    def _observe(self, ctx: RequestContext) -> None:
        for observe in self.observers:
            try:
                observe(ctx)
            except Exception:
                # An observer bug must not turn an answered request into a crash; it is logged.
                log.exception("pipeline.observer_failed", request_id=ctx.request_id)
