"""Builds the gateway: the pipeline, its routes, and the resources opened at start-up.

Three listeners: the API over TLS, a plain-HTTP redirect to it, and a loopback-only admin
app (metrics, health). Start-up refuses to go on without a policy, keys, the upstream secret
and TLS files: every one of them missing would otherwise be a silent allow or a silent leak.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from gateway import keys
from gateway.activity import ActivityJob, Anomaly
from gateway.archive.job import ArchiveJob, add_archive_api, gateway_job
from gateway.audit import HOURLY_QUERY, AuditWriter, protocol_error_event, system_event
from gateway.auditchain import verify as verify_chains
from gateway.auditcrypt import add_reencrypt_api, load_cipher
from gateway.auditsearch import search_events, serve_audit_search
from gateway.config import ConfigError
from gateway.console.csp import REPORT_PATH
from gateway.console.pages import PAGES, Console, disabled_handlers
from gateway.console.reports import report_stages
from gateway.identity.accounts import AccountStore, SharedAccounts
from gateway.identity.bruteforce import LoginGuard
from gateway.identity.endpoints import ROUTES as IDENTITY_ROUTES
from gateway.identity.endpoints import IdentityEndpoints, identity_stages
from gateway.identity.endpoints import render_denial as render_identity_denial
from gateway.identity.mfa import TotpVerifier
from gateway.identity.passwords import Passwords
from gateway.identity.provider import IdentityProvider
from gateway.identity.sessions import SessionCookieAuthenticator, SessionCookies, origin_of
from gateway.identity.state import StateStoreError, open_state_store
from gateway.identity.tokens import TokenService
from gateway.jwks import JwksFetcher
from gateway.keyring import KeyRing, KeyRingSource
from gateway.logs import active_mask, register_secret
from gateway.metrics import GatewayMetrics, exposition
from gateway.oidc import discover
from gateway.pipeline import Denial, Pipeline, Principal
from gateway.policy.dataapi import add_data_api
from gateway.policy.decisionlog import DecisionLog
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.policy.reload import PolicyReloader
from gateway.policy.remote import RemotePolicyEngine
from gateway.routes import RouteTable, load_routes
from gateway.secrets.inventory import inventory
from gateway.siem import SiemShipper
from gateway.stages.authn import (
    Authenticator,
    AuthnStage,
    BearerTokenAuthenticator,
    Revocation,
    TrustedIssuer,
)
from gateway.stages.authz import AuthzStage
from gateway.stages.forward import ForwardStage
from gateway.stages.local import LocalStage
from gateway.stages.normalize import NormalizeStage
from gateway.stages.route import RouteStage
from gateway.stages.validate import ValidateStage
from gateway.tls import client_context
from gateway.validation.anomaly import read_key as read_model_key
from gateway.validation.baseline import Baselines
from gateway.validation.outliers import ModelSlots
from gateway.validation.streams import StreamCatalog, load_streams
from gateway.validation.upstream_api import UpstreamReader
from gateway.workers import RemoteSearch, WorkerSlot, start_search_socket

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.config import GatewayConfig
    from gateway.pipeline import RequestContext, Stage
    from gateway.policy import PolicyEngine

log = structlog.get_logger("gateway.app")


@dataclass
class GatewayState:
    """What the running gateway holds; built before the sockets open."""

    config: GatewayConfig
    routes: RouteTable
    engine: PolicyEngine
    metrics: GatewayMetrics
    upstream_secret: keys.SecretFile  # re-read after a rotation (`secrets rotate`)
    keyring: KeyRing | None
    streams: StreamCatalog = field(default_factory=lambda: StreamCatalog(streams={}))
    checkpoint_key: Ed25519PrivateKey | None = None
    model_key: keys.ResolvedSecret | None = None  # re-resolved at each model load (a rotation)
    baselines: Baselines | None = None
    models: ModelSlots | None = None
    audit: AuditWriter | None = None
    decision_log: DecisionLog | None = None
    config_file: Path | None = None  # handed to the reload's `gateway policy test` child
    reloader: PolicyReloader | None = None
    identity: IdentityProvider | None = None
    cookies: SessionCookies | None = None
    identity_pipeline: Pipeline | None = None
    issuers: list[TrustedIssuer] = field(default_factory=list)
    fetchers: list[JwksFetcher] = field(default_factory=list)
    upstream_ok_at: float = 0.0
    api: Pipeline | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)
    archive: ArchiveJob | None = None  # retention (gateway/archive/), in the audit store's owner
    console_reports: Pipeline | None = None  # POST /console/csp-report (no credential needed)
    worker: WorkerSlot = field(default_factory=WorkerSlot)  # which of `serve --workers N`


STATE = web.AppKey("gateway_state", GatewayState)
UPSTREAM_SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)


def load_state(config: GatewayConfig, config_file: Path | None = None) -> GatewayState:
    """Everything that must exist before the gateway may listen; raises with what is missing."""
    engine = build_engine(config)
    metrics = GatewayMetrics()
    metrics.set_policy_revision(engine.revision)
    keyring = None
    if config.issuer.enabled:
        keyring = KeyRing(
            config.issuer.key_dir,
            allowed_algorithms=frozenset(config.authn.allowed_algorithms),
            retire_after_seconds=retire_after_seconds(config),
        )
        keyring.load()
        metrics.watch(metrics.signing_key_age, lambda: keyring.active_age_seconds)
    state = GatewayState(
        config_file=config_file,
        config=config,
        routes=load_routes(config.routes.file, config.routes.schema_dir),
        streams=load_streams(config.validation.streams_file, config.routes.schema_dir),
        checkpoint_key=keys.checkpoint_key(config),
        model_key=keys.model_key(config),
        engine=engine,
        metrics=metrics,
        upstream_secret=keys.SecretFile(config.upstream.secret_file, on_new=register_secret),
        keyring=keyring,
    )
    unknown = set(config.policy.dry_run_routes) - {r.name for r in state.routes.routes}
    if unknown:
        raise ConfigError(f"policy.dry_run_routes: no such route {min(unknown)!r}")
    if config.decision_log.enabled:
        log_config = config.decision_log
        state.decision_log = DecisionLog(
            log_config.path, erase=log_config.erase, mask=log_config.mask,
            entrypoint=config.policy.entrypoint, secrets=active_mask(),
        )  # fmt: skip
    if config.identity.enabled:
        state.identity, state.cookies = build_identity(config, keyring)
    return state


def build_engine(config: GatewayConfig) -> PolicyEngine:
    """The embedded engine over policy.dir, or the remote OPA server (its pool opens later)."""
    policy = config.policy
    if policy.engine == "opa-server":
        return RemotePolicyEngine(
            policy.opa_url,
            entrypoint=policy.entrypoint,
            timeout_ms=policy.opa_timeout_ms,
            pool_size=policy.opa_pool_size,
            revision_label=policy.opa_revision_label,
        )
    return EmbeddedPolicyEngine.from_directory(
        policy.dir, policy.entrypoint, memo_size=policy.decision_memo_size
    )


def retire_after_seconds(config: GatewayConfig) -> int:
    """How long a retired signing key stays published: the longest token life plus leeway."""
    return config.issuer.max_ttl_seconds + config.authn.leeway_seconds


def build_identity(
    config: GatewayConfig, keyring: KeyRing | None
) -> tuple[IdentityProvider, SessionCookies]:
    """The identity provider; a missing key file or account store refuses to start."""
    assert keyring is not None  # noqa: S101 - config check: identity needs the issuer
    identity = config.identity
    state_store = open_state_store(identity.state_url)
    tokens = TokenService(
        signing_key=lambda: keyring.active,
        state=state_store,
        issuer=config.issuer.issuer,
        audience=config.issuer.audience,
        access_ttl_seconds=config.issuer.default_ttl_seconds,
        refresh_ttl_seconds=identity.tokens.refresh_ttl_seconds,
        session_ttl_seconds=identity.tokens.session_ttl_seconds,
    )
    # Created (and migrated) by `gateway setup`; opening it here proves it is usable.
    AccountStore.open_waiting(identity.db_path).close()
    limits = identity.login_limits
    provider = IdentityProvider(
        config=identity,
        accounts=SharedAccounts(identity.db_path),
        passwords=Passwords(identity.passwords),
        tokens=tokens,
        guard=LoginGuard(
            storage_url=identity.state_url,
            per_ip=limits.per_ip,
            per_user_ip_failures=limits.per_user_ip_failures,
            per_user_failures=limits.per_user_failures,
        ),
        totp=TotpVerifier(state_store),
        totp_box=keys.totp_box(config),
        session_box=keys.session_box(config),
    )
    cookies = SessionCookies(
        box=provider.session_box,
        name=identity.sessions.cookie_name,
        max_age_seconds=identity.tokens.session_ttl_seconds,
    )
    return provider, cookies


def allowed_origins(config: GatewayConfig) -> frozenset[str]:
    """The origins a browser may send cookie requests from: the issuer's and the public name's."""
    port = config.server.https_port
    public = config.server.public_name
    own = f"https://{public}" if port == 443 else f"https://{public}:{port}"  # noqa: PLR2004
    return frozenset({origin_of(config.issuer.issuer), own.lower()})


async def _issuers(state: GatewayState, jwks_session: aiohttp.ClientSession) -> list[TrustedIssuer]:
    config = state.config
    allowed = frozenset(config.authn.allowed_algorithms)
    issuers: list[TrustedIssuer] = []
    if state.keyring is not None:
        own = config.issuer
        issuers.append(
            TrustedIssuer(own.issuer, (own.audience,), "roles", KeyRingSource(state.keyring))
        )
    for trusted in config.authn.issuers:
        jwks_uri = trusted.jwks_uri
        if not jwks_uri:
            # OIDC discovery; an IdP that cannot be discovered at start refuses the start.
            metadata = await discover(
                jwks_session,
                trusted.issuer,
                timeout_seconds=config.authn.jwks_fetch_timeout_seconds,
            )
            jwks_uri = metadata.jwks_uri
        fetcher = JwksFetcher(
            uri=jwks_uri,
            session=jwks_session,
            allowed_algorithms=allowed,
            cache_seconds=config.authn.jwks_cache_seconds,
            cooldown_seconds=config.authn.jwks_refetch_cooldown_seconds,
            timeout_seconds=config.authn.jwks_fetch_timeout_seconds,
        )
        state.fetchers.append(fetcher)
        issuers.append(
            TrustedIssuer(
                trusted.issuer, trusted.audiences, trusted.roles_claim, fetcher, trusted.role_map
            )
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
        revoked=_revocation(state),
    )
    authenticators: list[Authenticator] = [authenticator]
    if state.identity is not None and state.cookies is not None:
        authenticators.append(
            SessionCookieAuthenticator(
                cookies=state.cookies,
                tokens=state.identity.tokens,
                allowed_origins=allowed_origins(config),
                revalidate=state.identity.current_grant,
                revalidate_seconds=config.identity.sessions.revalidate_seconds,
            )
        )
    return [
        NormalizeStage(),
        AuthnStage(authenticators),
        RouteStage(state.routes),
        AuthzStage(
            lambda: state.engine,
            budget_ms=config.policy.eval_budget_ms,
            dry_run=config.policy.mode == "dry-run",
            dry_run_routes=config.policy.dry_run_routes,
            explain=config.server.environment == "development",
            decision_log=state.decision_log,
        ),
        ValidateStage(
            state.routes,
            max_body_bytes=config.limits.max_body_bytes,
            max_depth=config.limits.max_json_depth,
            streams=state.streams,
            baselines=state.baselines,
            models=state.models,
        ),
        LocalStage(
            {
                "audit.search": lambda ctx: serve_audit_search(
                    ctx, state.audit, _remote_search(state)
                ),
                **_console_handlers(state, upstream),
            }
        ),
        ForwardStage(
            session=upstream,
            base_url=config.upstream.url,
            secret=state.upstream_secret.current,
            max_body_bytes=config.limits.max_body_bytes,
            read_timeout_seconds=config.upstream.read_timeout_seconds,
        ),
    ]


def _console_handlers(
    state: GatewayState, upstream: aiohttp.ClientSession
) -> dict[str, Callable[[RequestContext], Awaitable[web.StreamResponse]]]:
    """The admin console's pages (gateway/console/), or 404s when it is off."""
    if not state.config.console.enabled:
        return disabled_handlers()
    console = Console(
        state,
        upstream=upstream,
        search=lambda search: search_events(
            state.audit, search, _remote_search(state), flush=False
        ),
    )
    return console.handlers()


def _revocation(state: GatewayState) -> Revocation | None:
    """The revocation check for the built-in issuer's tokens (jti denylist, ended session)."""
    identity = state.identity
    if identity is None:
        return None
    own = state.config.issuer.issuer

    async def revoked(principal: Principal) -> bool:
        # Any issuer's token can be denylisted by its jti (logout); only ours carry sessions.
        jti, sid = principal.claims.get("jti"), principal.claims.get("sid")
        if principal.issuer != own:
            sid = None
        try:
            return await identity.tokens.is_revoked(
                jti if isinstance(jti, str) else None, sid if isinstance(sid, str) else None
            )
        except StateStoreError:
            # Fail closed: without the denylist a revoked token would pass.
            log.exception("identity.state_unavailable")
            raise Denial("auth.unavailable", "authentication is unavailable") from None

    return revoked


def build_identity_stages(state: GatewayState, api_stages: list[Stage]) -> list[Stage]:
    """The pipeline of the endpoints the gateway serves itself (/.well-known, /oauth, /auth)."""
    keyring = state.keyring
    assert keyring is not None  # noqa: S101 - only built when the issuer is enabled
    endpoints = IdentityEndpoints(
        provider=state.identity,
        cookies=state.cookies,
        jwks=keyring.public_jwks,
        issuer=state.config.issuer.issuer,
        algorithm=lambda: str(keyring.active["alg"]),
        allowed_origins=allowed_origins(state.config),
    )
    authn = next(stage for stage in api_stages if stage.name == "authn")
    return identity_stages(
        normalize=NormalizeStage(),
        route=RouteStage(RouteTable([route for route, _ in IDENTITY_ROUTES])),
        authn=authn,
        endpoints=endpoints,
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


# On every API response unless the handler set its own (the login page sets a stricter CSP).
# A JSON API needs no sources at all: a response a browser is tricked into rendering runs
# nothing and cannot be framed.
_HARDENING = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
}
_HSTS = "max-age=31536000; includeSubDomains"


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # Name the product, not the framework and its version.
    response.headers["Server"] = "emp-gateway"


async def _hardening_headers(request: web.Request, response: web.StreamResponse) -> None:
    await _server_header(request, response)
    headers = response.headers
    for name, value in _HARDENING.items():
        headers.setdefault(name, value)
    if request.secure:
        headers["Strict-Transport-Security"] = _HSTS
    # Anything answered to a credential is private to it: no shared or browser cache keeps it,
    # whatever the upstream said.
    session_cookie = request.app[STATE].config.identity.sessions.cookie_name
    if "Authorization" in request.headers or session_cookie in request.cookies:
        headers["Cache-Control"] = "no-store"


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
    app.on_response_prepare.append(_hardening_headers)
    app.cleanup_ctx.append(_audit_ctx)
    app.cleanup_ctx.append(_remote_policy_ctx)
    app.cleanup_ctx.append(_sessions_ctx)

    # The pipelines need the sessions opened at start-up, but the router freezes before that:
    # register thin handlers now and let them reach the pipelines built in _sessions_ctx.
    async def serve_identity(request: web.Request) -> web.StreamResponse:
        if state.identity_pipeline is None:
            raise web.HTTPServiceUnavailable
        return await state.identity_pipeline(request)

    async def serve_api(request: web.Request) -> web.StreamResponse:
        if state.api is None:
            raise web.HTTPServiceUnavailable
        return await state.api(request)

    async def serve_csp_report(request: web.Request) -> web.StreamResponse:
        if state.console_reports is None:
            raise web.HTTPServiceUnavailable
        return await state.console_reports(request)

    if state.keyring is not None:
        for prefix in ("/.well-known/", "/oauth/", "/auth/"):
            app.router.add_route("*", prefix + "{tail:.*}", serve_identity)
    if state.config.console.enabled:
        app.router.add_route("*", REPORT_PATH, serve_csp_report)
    app.router.add_route("*", "/{tail:.*}", serve_api)
    return app


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    audit_config = state.config.audit
    # Only the store's owner holds the data keys; no ring, no start (ConfigError, exit 2).
    owner = state.worker.owner
    cipher = await asyncio.to_thread(load_cipher, state.config) if owner else None
    shipper = await _start_siem(state)
    state.audit = AuditWriter(
        jsonl_path=audit_config.jsonl_path,
        db_path=audit_config.db_path,
        flush_interval_seconds=audit_config.flush_interval_seconds,
        batch_size=audit_config.batch_size,
        checkpoint_key=state.checkpoint_key,
        forward=shipper.submit if shipper is not None else None,
        mask_text=active_mask().mask_text,
        handoff=not owner,  # another worker owns the DuckDB file
        cipher=cipher,
    )
    state.metrics.watch(
        state.metrics.audit_backlog, lambda: state.audit.backlog if state.audit else 0
    )
    await state.audit.start()
    side = await _start_worker_side(state)
    activity = state.config.activity
    job_task = None
    if activity.enabled and state.audit.owns_store:
        job = ActivityJob(state.audit, activity, report=_activity_reporter(state))
        job_task = asyncio.create_task(job.run(), name="activity-job")
    if state.audit.owns_store:  # one process archives (gateway/archive/): the store's owner
        state.archive = gateway_job(state)
        if state.config.retention.enabled:
            state.archive.start()
    yield
    if job_task is not None:
        job_task.cancel()
    if state.archive is not None:  # before the store closes; a run stops at its next step
        await state.archive.close()
    for stop in side:
        await stop()
    # Runs after aiohttp has stopped accepting and finished in-flight requests: drain.
    await state.audit.close()
    log.info("audit.drained", written=state.audit.written)
    if shipper is not None:  # after the writer: its last events are submitted by then
        await shipper.close(timeout=5.0)
        log.info("siem.closed", backlog=shipper.backlog, delivered=shipper.delivered)


async def _start_worker_side(state: GatewayState) -> list[Callable[[], Awaitable[None]]]:
    """With several workers: worker 0's search socket, every worker's metric sampling."""
    stops: list[Callable[[], Awaitable[None]]] = []
    slot = state.worker
    if not slot.shared:
        return stops
    if state.audit is not None and state.audit.owns_store:
        runner = await start_search_socket(state.audit, slot.search_socket)
        stops.append(runner.cleanup)
    metrics = state.metrics

    async def sample() -> None:
        while True:
            metrics.sample()
            await asyncio.sleep(1.0)

    task = asyncio.create_task(sample(), name="metrics-sample")

    async def stop_sampling() -> None:
        task.cancel()
        metrics.sample()  # the last values, for the scrape that follows the drain

    stops.append(stop_sampling)
    return stops


def _remote_search(state: GatewayState) -> RemoteSearch | None:
    """How a worker without the audit store asks worker 0 (None: this one owns it)."""
    if state.worker.owner:
        return None
    return RemoteSearch(state.worker.search_socket)


async def _start_siem(state: GatewayState) -> SiemShipper | None:
    """The SIEM shipper, with its metrics, when [siem] is enabled."""
    config = state.config.siem
    if not config.enabled:
        return None
    metrics = state.metrics
    if state.worker.shared:  # one spool per process: never two writers on one file
        config = dataclasses.replace(
            config, spool_dir=config.spool_dir / f"worker-{state.worker.index}"
        )
    shipper = SiemShipper(
        config,
        on_failure=lambda _reason: metrics.siem_delivery_failures.inc(),
        on_up=lambda up: metrics.siem_up.set(int(up)),
    )
    metrics.watch(metrics.siem_backlog, lambda: shipper.backlog)
    await shipper.start()
    return shipper


def _activity_reporter(state: GatewayState) -> Callable[[Anomaly], None]:
    def report(anomaly: Anomaly) -> None:
        state.metrics.activity_anomalies.labels(anomaly.entity_type, anomaly.feature).inc()
        log.warning("activity.anomaly", **anomaly.as_dict())
        if state.audit is not None:
            state.audit.emit(system_event("anomaly.activity", **anomaly.as_dict()))

    return report


async def _remote_policy_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[STATE].engine
    if not isinstance(engine, RemotePolicyEngine):
        yield
        return
    async with engine:  # the pool to OPA lives as long as the app
        yield


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
    try:
        state.issuers = await _issuers(state, jwks_session)
    except Exception:
        await upstream.close()
        await jwks_session.close()
        raise
    await asyncio.gather(*(f.refresh(force=True) for f in state.fetchers))
    _start_validation(state, upstream)
    stages = build_stages(state, upstream)
    state.api = Pipeline(stages, observers=_observers(state))
    if config.console.enabled:
        origins = allowed_origins(config)
        reports = report_stages(config.console, allowed_origins=origins, pages=PAGES)
        state.console_reports = Pipeline(reports, observers=_observers(state))
    if state.keyring is not None:
        state.identity_pipeline = Pipeline(
            build_identity_stages(state, stages),
            observers=_observers(state),
            render_denial=render_identity_denial,
        )
        state.background.append(asyncio.create_task(_watch_keyring(state)))
    state.background.append(asyncio.create_task(_watch_secrets(state), name="secret-ages"))
    if config.policy.engine == "embedded":  # a remote OPA loads its own policies
        state.reloader = _reloader(state)
        if config.policy.watch:
            state.background.append(asyncio.create_task(state.reloader.watch()))
    yield
    state.api = state.identity_pipeline = state.console_reports = None
    for task in state.background:
        task.cancel()
    await upstream.close()
    await jwks_session.close()
    if state.decision_log is not None:
        state.decision_log.close()
    if state.identity is not None:
        await state.identity.guard.close()
        await state.identity.tokens.state.close()


async def _watch_secrets(state: GatewayState) -> None:
    """Keep the secret-age and certificate-expiry metrics current (secrets.refresh_seconds)."""
    while True:
        try:
            states = await asyncio.to_thread(inventory, state.config)
        except Exception:  # a metric refresh must never stop the gateway
            log.exception("secrets.inventory_failed")
        else:
            state.metrics.observe_secrets(states)
            for failing in (s for s in states if s.failing):
                log.warning("secrets.attention", item=failing.name, status=failing.status,
                            source=failing.source)  # fmt: skip
        await asyncio.sleep(state.config.secrets.refresh_seconds)


def _start_validation(state: GatewayState, upstream: aiohttp.ClientSession) -> None:
    """The stream baselines (refreshed in the background) and the lazily loaded models."""
    config = state.config
    reader = UpstreamReader(upstream, config.upstream.url, state.upstream_secret.current)

    def report(kind: str, detail: dict[str, Any]) -> None:
        if state.audit is not None:
            state.audit.emit(system_event(kind, **detail))

    specs = state.streams.with_statistics()
    state.baselines = Baselines(specs, reader.stats)
    if specs:
        state.background.append(asyncio.create_task(state.baselines.run(), name="baselines"))
    model_key = state.model_key or keys.model_key(config)
    state.models = ModelSlots(
        config.validation.model_dir,
        lambda: read_model_key(model_key),
        check_seconds=config.validation.model_check_seconds,
        report=report,
    )


def _reloader(state: GatewayState) -> PolicyReloader:
    config = state.config

    def swap(engine: EmbeddedPolicyEngine) -> None:
        state.metrics.set_policy_revision(engine.revision)
        state.engine = engine  # the authz stage reads it per request: the next one uses it

    def report(kind: str, detail: dict[str, Any]) -> None:
        outcome = "accepted" if kind == "policy.reloaded" else "rejected"
        state.metrics.policy_reloads.labels(outcome).inc()
        if state.audit is not None:
            state.audit.emit(system_event(kind, **detail))

    return PolicyReloader(
        directory=config.policy.dir,
        entrypoint=config.policy.entrypoint,
        memo_size=config.policy.decision_memo_size,
        revision=state.engine.revision,
        config_file=state.config_file,
        swap=swap,
        report=report,
        timeout_seconds=config.policy.reload_test_timeout_seconds,
    )


async def _watch_keyring(state: GatewayState, interval_seconds: float = 2.0) -> None:
    """Pick up `gateway keys rotate` from another process: the new key signs within seconds."""
    keyring = state.keyring
    assert keyring is not None  # noqa: S101 - started only with the issuer
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            if keyring.reload_if_changed():
                log.info("keys.reloaded", revision=keyring.revision)
                if state.audit is not None:
                    state.audit.emit(
                        system_event(
                            "keys.reloaded",
                            active_kid=keyring.active["kid"],
                            revision=keyring.revision,
                        )
                    )
        except Exception:
            log.exception("keys.reload_failed")


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


def build_admin_app(api: web.Application) -> web.Application:  # noqa: C901 - one closure per path
    """Loopback-only: /metrics, /healthz (alive), /readyz (able to serve)."""
    admin = web.Application()
    admin.on_response_prepare.append(_server_header)
    state = api[STATE]

    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = exposition(state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        engine = state.engine
        if isinstance(engine, RemotePolicyEngine):
            policy_ready = await engine.reachable()  # OPA's /health: a sidecar that is down
        else:
            policy_ready = bool(engine.revision)
        checks = {
            "policy": policy_ready,
            "keys": bool(state.issuers) and all(i.keys.ready for i in state.issuers),
            "upstream": UPSTREAM_SESSION in api and await upstream_reachable(api),
            "audit": state.audit is not None,
        }
        if state.identity is not None:
            # Logins and every built-in token need the shared state: without it, not ready.
            checks["identity_state"] = await state.identity.tokens.state.ping()
        ready = all(checks.values())
        body: dict[str, Any] = {
            "status": "ready" if ready else "not_ready",
            "checks": checks,
            "policy_revision": state.engine.revision,
        }
        if state.baselines is not None and state.streams.with_statistics():
            body["baselines"] = state.baselines.status()
        if state.models is not None and state.streams.with_models():
            body["models"] = state.models.status()
        if state.reloader is not None:
            # A rejected edit does not make the gateway unready (the last good revision
            # serves), but it is shown here until a reload succeeds.
            body["policy_reload"] = state.reloader.status.as_dict()
        return web.json_response(body, status=200 if ready else 503)

    async def validation_hourly(request: web.Request) -> web.Response:
        hours = request.query.get("hours", "24")
        if not hours.isdigit() or not 1 <= int(hours) <= 24 * 90:
            return web.json_response(
                {"error": "hours must be an integer from 1 to 2160"}, status=400
            )
        if state.audit is None:
            return web.json_response({"error": "the audit store is not open"}, status=503)
        rows = await state.audit.query(HOURLY_QUERY, [int(hours)])
        names = ("hour", "stream", "batches", "received", "accepted", "quarantined", "rejected",
                 "refused_batches")  # fmt: skip
        items = [dict(zip(names, row, strict=True)) for row in rows]
        for item in items:
            item["hour"] = item["hour"].strftime("%Y-%m-%dT%H:00:00Z")
        return web.json_response({"hours": int(hours), "items": items})

    async def audit_verify(_request: web.Request) -> web.Response:
        if state.audit is None:
            return web.json_response({"error": "the audit store is not open"}, status=503)
        public = state.checkpoint_key.public_key() if state.checkpoint_key else None
        cipher = state.audit.cipher
        reports = await state.audit.run(lambda cursor: verify_chains(cursor, public, cipher))
        body = {
            "intact": all(r.intact for r in reports),
            "chains": [
                {"chain": r.chain, "events": r.events, "first_seq": r.first_seq,
                 "last_seq": r.last_seq, "checkpoints": r.checkpoints, "problems": r.problems,
                 "archived_through": r.archived_through}
                for r in reports
            ],
        }  # fmt: skip
        return web.json_response(body, status=200 if body["intact"] else 409)

    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/audit/verify", audit_verify)
    add_archive_api(admin, lambda: state.archive)
    add_reencrypt_api(admin, lambda: state.audit, lambda: load_cipher(state.config))
    admin.router.add_get("/validation/hourly", validation_hourly)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    policy = state.config.policy
    if policy.engine == "embedded":
        add_data_api(
            admin, lambda: state.engine, entrypoint=policy.entrypoint, policy_dir=policy.dir
        )
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
