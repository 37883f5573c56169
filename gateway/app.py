"""Builds the gateway: the pipeline, its routes, and the resources opened at start-up.

Three listeners: the API over TLS, a plain-HTTP redirect to it, and a loopback-only admin
app (metrics, health). Start-up refuses to go on without a policy, keys, the upstream secret
and TLS files: every one of them missing would otherwise be a silent allow or a silent leak.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import keys
from gateway.audit import AuditWriter, protocol_error_event
from gateway.jwks import JwksFetcher, KeySource, StaticKeySource, parse_jwks
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline, RequestContext
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.routes import RouteTable, load_routes
from gateway.stages.authn import AuthnStage, BearerTokenAuthenticator, TrustedIssuer
from gateway.stages.authz import AuthzStage
from gateway.stages.forward import ForwardStage
from gateway.stages.normalize import NormalizeStage
from gateway.stages.route import RouteStage
from gateway.stages.validate import ValidateStage
from gateway.tls import client_context

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Awaitable, Callable

    from gateway.config import GatewayConfig
    from gateway.pipeline import Stage
    from gateway.policy import PolicyEngine

log = structlog.get_logger("gateway.app")


@dataclass
class GatewayState:
    """What the running gateway holds; built before the sockets open."""

    config: GatewayConfig
    routes: RouteTable
    engine: PolicyEngine
    metrics: GatewayMetrics
    upstream_secret: str
    dev_jwks: dict[str, Any] | None
    audit: AuditWriter | None = None
    issuers: list[TrustedIssuer] = field(default_factory=list)
    fetchers: list[JwksFetcher] = field(default_factory=list)
    upstream_ok_at: float = 0.0
    api: Pipeline | None = None
    public: Pipeline | None = None


STATE = web.AppKey("gateway_state", GatewayState)
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


def load_state(config: GatewayConfig) -> GatewayState:
    """Everything that must exist before the gateway may listen; raises with what is missing."""
    engine = EmbeddedPolicyEngine.from_directory(
        config.policy.dir, config.policy.entrypoint, memo_size=config.policy.decision_memo_size
    )
    metrics = GatewayMetrics()
    metrics.policy_info.labels(engine.revision).set(1)
    dev_jwks = None
    if config.dev_issuer.enabled:
        dev_jwks = keys.public_jwks(keys.load_private_keys(config.dev_issuer.key_dir))
    return GatewayState(
        config=config,
        routes=load_routes(config.routes.file, config.routes.schema_dir),
        engine=engine,
        metrics=metrics,
        upstream_secret=keys.read_secret(config.upstream.secret_file),
        dev_jwks=dev_jwks,
    )


def _issuers(state: GatewayState, jwks_session: aiohttp.ClientSession) -> list[TrustedIssuer]:
    config = state.config
    allowed = frozenset(config.authn.allowed_algorithms)
    issuers: list[TrustedIssuer] = []
    if state.dev_jwks is not None:
        source: KeySource = StaticKeySource(parse_jwks(state.dev_jwks, allowed))
        dev = config.dev_issuer
        issuers.append(TrustedIssuer(dev.issuer, (dev.audience,), "roles", source))
    for trusted in config.authn.issuers:
        fetcher = JwksFetcher(
            uri=trusted.jwks_uri,
            session=jwks_session,
            allowed_algorithms=allowed,
            cache_seconds=config.authn.jwks_cache_seconds,
            cooldown_seconds=config.authn.jwks_refetch_cooldown_seconds,
            timeout_seconds=config.authn.jwks_fetch_timeout_seconds,
        )
        state.fetchers.append(fetcher)
        issuers.append(
            TrustedIssuer(trusted.issuer, trusted.audiences, trusted.roles_claim, fetcher)
        )
    return issuers


def build_stages(state: GatewayState, upstream: aiohttp.ClientSession) -> list[Stage]:
    """The pipeline, in order. Adding a stage is one line here."""
    config = state.config
    authenticator = BearerTokenAuthenticator(
        issuers=state.issuers,
        allowed_algorithms=config.authn.allowed_algorithms,
        leeway_seconds=config.authn.leeway_seconds,
        max_token_bytes=config.authn.max_token_bytes,
        cache_size=config.authn.verified_cache_size,
        cache_seconds=config.authn.verified_cache_seconds,
    )
    return [
        NormalizeStage(),
        AuthnStage([authenticator]),
        RouteStage(state.routes),
        AuthzStage(lambda: state.engine, budget_ms=config.policy.eval_budget_ms),
        ValidateStage(state.routes, max_body_bytes=config.limits.max_body_bytes),
        ForwardStage(
            session=upstream,
            base_url=config.upstream.url,
            secret=state.upstream_secret,
            max_body_bytes=config.limits.max_body_bytes,
            read_timeout_seconds=config.upstream.read_timeout_seconds,
        ),
    ]


class ServeJwks:
    """Terminal stage of the public pipeline: the dev issuer's public keys."""

    name = "serve_jwks"

    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    async def __call__(self, ctx: RequestContext) -> None:
        """Answer with the JWKS document (public keys only)."""
        ctx.response = web.json_response(
            self._document,
            headers={"Cache-Control": "public, max-age=300", "X-Request-Id": ctx.request_id},
        )


def _observers(state: GatewayState) -> list[Any]:
    observers: list[Any] = [state.metrics.observe_request]
    if state.audit is not None:
        observers.append(state.audit.emit_request)
    return observers


def protocol_error_hook(app: web.Application) -> Callable[[str, int, str, str | None], None]:
    """Audit and count requests the HTTP parser refused (they never enter the pipeline)."""
    state = app[STATE]

    def record(request_id: str, status: int, reason_id: str, remote: str | None) -> None:
        if state.audit is not None:
            state.audit.emit(protocol_error_event(request_id, status, reason_id, remote))
        state.metrics.observe_refusal("-", status, reason_id)

    return record


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # Name the product, not the framework and its version.
    response.headers["Server"] = "emp-gateway"


@web.middleware
async def _unmatched_to_pipeline(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # A target the router cannot match even to the catch-all (`OPTIONS *`, absolute forms it
    # rejects) would get aiohttp's plain 404 with no audit event: send it through the pipeline.
    if request.match_info.http_exception is not None:
        api = request.app[STATE].api
        if api is not None:
            return await api(request)
    return await handler(request)


def build_app(state: GatewayState) -> web.Application:
    """The HTTPS API application."""
    app = web.Application(
        client_max_size=state.config.limits.max_body_bytes, middlewares=[_unmatched_to_pipeline]
    )
    app[STATE] = state
    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(_audit_ctx)
    app.cleanup_ctx.append(_sessions_ctx)

    # The pipelines need the sessions opened at start-up, but the router freezes before that:
    # register thin handlers now and let them reach the pipelines built in _sessions_ctx.
    async def serve_public(request: web.Request) -> web.StreamResponse:
        if state.public is None:
            raise web.HTTPNotFound
        return await state.public(request)

    async def serve_api(request: web.Request) -> web.StreamResponse:
        if state.api is None:
            raise web.HTTPServiceUnavailable
        return await state.api(request)

    if state.dev_jwks is not None:
        app.router.add_get("/.well-known/jwks.json", serve_public)
    app.router.add_route("*", "/{tail:.*}", serve_api)
    return app


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    audit_config = state.config.audit
    state.audit = AuditWriter(
        jsonl_path=audit_config.jsonl_path,
        db_path=audit_config.db_path,
        flush_interval_seconds=audit_config.flush_interval_seconds,
        batch_size=audit_config.batch_size,
    )
    await state.audit.start()
    yield
    # Runs after aiohttp has stopped accepting and finished in-flight requests: drain.
    await state.audit.close()
    log.info("audit.drained", written=state.audit.written)


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    connector = aiohttp.TCPConnector(
        limit=config.upstream.pool_size, keepalive_timeout=30, ttl_dns_cache=300
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=config.upstream.connect_timeout_seconds)
    upstream = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    jwks_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_jwks_ssl(config)))
    app[UPSTREAM_SESSION] = upstream
    state.issuers = _issuers(state, jwks_session)
    await asyncio.gather(*(f.refresh(force=True) for f in state.fetchers))
    state.api = Pipeline(build_stages(state, upstream), observers=_observers(state))
    if state.dev_jwks is not None:
        state.public = Pipeline(
            [NormalizeStage(), ServeJwks(state.dev_jwks)], observers=_observers(state)
        )
    yield
    state.api = state.public = None
    await upstream.close()
    await jwks_session.close()


def _jwks_ssl(config: GatewayConfig) -> ssl.SSLContext:
    cas = [i.ca_file for i in config.authn.issuers if i.ca_file is not None]
    return client_context(cas[0] if cas else None)  # config allows at most one


async def upstream_reachable(app: web.Application) -> bool:
    """GET the upstream's health path; cached for two seconds to spare it from probe storms."""
    state = app[STATE]
    if time.monotonic() - state.upstream_ok_at < 2.0:  # noqa: PLR2004 - the cache window
        return True
    try:
        session = app[UPSTREAM_SESSION]
        url = state.config.upstream.url.rstrip("/") + state.config.upstream.health_path
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as response:
            ok = response.status == 200  # noqa: PLR2004 - HTTP OK
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    if ok:
        state.upstream_ok_at = time.monotonic()
    return ok


def build_admin_app(api: web.Application) -> web.Application:
    """Loopback-only: /metrics, /healthz (alive), /readyz (able to serve)."""
    admin = web.Application()
    admin.on_response_prepare.append(_server_header)
    state = api[STATE]

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        checks = {
            "policy": bool(state.engine.revision),
            "keys": bool(state.issuers) and all(i.keys.ready for i in state.issuers),
            "upstream": UPSTREAM_SESSION in api and await upstream_reachable(api),
            "audit": state.audit is not None,
        }
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not_ready", "checks": checks,
                "policy_revision": state.engine.revision}  # fmt: skip
        return web.json_response(body, status=200 if ready else 503)

    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin


def build_redirect_app(config: GatewayConfig) -> web.Application:
    """Plain HTTP answers only with a redirect to HTTPS (never serves the API in clear)."""
    app = web.Application()
    app.on_response_prepare.append(_server_header)
    port = config.server.https_port
    host = config.server.public_name
    authority = host if port == 443 else f"{host}:{port}"  # noqa: PLR2004 - the HTTPS default

    async def redirect(request: web.Request) -> web.Response:
        # The target host comes from config, never from the Host header (no open redirect).
        location = f"https://{authority}{request.raw_path}"
        return web.Response(status=308, headers={"Location": location, "Cache-Control": "no-store"})

    app.router.add_route("*", "/{tail:.*}", redirect)
    return app
