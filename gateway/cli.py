"""The `gateway` command: serve, certs, keys, token, policy, config, setup.

Every subcommand reads the same config file; a bad config exits 2 with the key named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from gateway import keys, tls
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.logs import configure_logging
from gateway.policy import PolicyError

log = structlog.get_logger("gateway.cli")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load config, run the subcommand; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    configure_logging(config.logging)
    try:
        return int(args.func(config, args))
    except (ConfigError, PolicyError, FileNotFoundError, ValueError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)  # noqa: T201
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="default: config/gateway.toml")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway in the foreground until SIGINT/SIGTERM")
    serve.set_defaults(func=cmd_serve)

    setup = sub.add_parser(
        "setup", help="create dev certs, keys and the upstream secret if missing"
    )
    setup.set_defaults(func=cmd_setup)

    certs = sub.add_parser("certs", help="TLS certificates").add_subparsers(
        dest="what", required=True
    )
    dev = certs.add_parser("dev", help="create a dev CA (var/certs/ca.pem) and a localhost cert")
    dev.add_argument("--force", action="store_true", help="replace existing files")
    dev.set_defaults(func=cmd_certs_dev)

    key_cmd = sub.add_parser("keys", help="signing keys and secrets").add_subparsers(
        dest="what", required=True
    )
    init = key_cmd.add_parser("init", help="create the dev signing key and the upstream secret")
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(func=cmd_keys_init)

    token = sub.add_parser("token", help="tokens of the dev issuer").add_subparsers(
        dest="what", required=True
    )
    mint = token.add_parser("mint", help="print an access token the running gateway accepts")
    mint.add_argument("--sub", required=True, help="the subject (user or client id)")
    mint.add_argument("--role", action="append", default=[], help="a role; repeat for several")
    mint.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
    mint.add_argument("--claim", action="append", default=[], metavar="NAME=JSON",
                      help="an extra claim, value as JSON (e.g. department_id=3)")  # fmt: skip
    mint.set_defaults(func=cmd_token_mint)

    policy = sub.add_parser("policy", help="the Rego policies").add_subparsers(
        dest="what", required=True
    )
    ptest = policy.add_parser("test", help="run every test_* rule in the policy directory")
    ptest.add_argument("--dir", type=Path, default=None, help="default: policy.dir from config")
    ptest.set_defaults(func=cmd_policy_test)

    check = sub.add_parser("config", help="configuration").add_subparsers(
        dest="what", required=True
    )
    show = check.add_parser("check", help="validate the config, routes and policy; print a summary")
    show.set_defaults(func=cmd_config_check)
    return parser


def cmd_setup(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Idempotent dev set-up: certificates, the dev signing key, the upstream secret."""
    args.force = False
    cmd_certs_dev(config, args)
    return cmd_keys_init(config, args)


def cmd_certs_dev(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Create the dev CA and server certificate."""
    written = tls.write_dev_certs(config.tls, force=args.force)
    for path in written:
        print(f"wrote {path}")  # noqa: T201
    if not written:
        print(f"certificates exist ({config.tls.cert_file}); --force replaces them")  # noqa: T201
    return 0


def cmd_keys_init(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Create the dev issuer key and the upstream shared secret."""
    if keys.ensure_signing_key(config.dev_issuer.key_dir, force=args.force):
        print(f"wrote {config.dev_issuer.key_dir / keys.SIGNING_KEYS_FILE}")  # noqa: T201
    if keys.ensure_upstream_secret(config.upstream.secret_file, force=args.force):
        print(f"wrote {config.upstream.secret_file}")  # noqa: T201
    return 0


def cmd_token_mint(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Sign a token with the dev issuer's newest key and print it."""
    dev = config.dev_issuer
    if not dev.enabled:
        raise ConfigError("dev_issuer.enabled is false: this gateway mints no tokens")
    ttl = args.ttl if args.ttl is not None else dev.default_ttl_seconds
    if not 0 < ttl <= dev.max_ttl_seconds:
        raise ValueError(f"--ttl must be within 1..{dev.max_ttl_seconds} seconds")
    extra = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or name in {"iss", "aud", "sub", "exp", "iat", "nbf", "roles"}:
            raise ValueError(f"--claim {name!r}: use NAME=JSON for a non-registered claim")
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            extra[name] = value
    private = keys.load_private_keys(dev.key_dir)[0]
    token = keys.mint_token(
        private, issuer=dev.issuer, audience=dev.audience, subject=args.sub,
        roles=args.role, ttl_seconds=ttl, extra_claims=extra,
    )  # fmt: skip
    print(token)  # noqa: T201
    return 0


def cmd_policy_test(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Run the Rego tests; non-zero when any fails or none exist."""
    from gateway.policy.testing import run_policy_tests  # noqa: PLC0415 - regopy only when asked

    results = run_policy_tests(args.dir or config.policy.dir)
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        print(f"{mark} {result.module}: {result.name} {result.error}".rstrip())  # noqa: T201
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")  # noqa: T201
    return 1 if failed or not results else 0


def cmd_config_check(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Load everything serve would load, without listening."""
    from gateway.app import load_state  # noqa: PLC0415 - keeps `token mint` light

    state = load_state(config)
    tls.server_context(config.tls)
    print(f"config ok: {len(state.routes.routes)} routes, policy revision {state.engine.revision}")  # noqa: T201
    return 0


def cmd_serve(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Run until a signal; a missing policy, key, secret or certificate refuses to start."""
    return asyncio.run(_serve(config))


async def _serve(config: GatewayConfig) -> int:
    from gateway.app import (  # noqa: PLC0415 - serve-only imports stay off `token mint`
        build_admin_app,
        build_app,
        build_redirect_app,
        load_state,
        protocol_error_hook,
    )
    from gateway.server import GatewayRunner  # noqa: PLC0415

    state = load_state(config)
    ssl_context = tls.server_context(config.tls)
    api = build_app(state)
    server = config.server
    runners: list[web.AppRunner] = []
    # Admin first (health answers "not ready" until the API is up), redirect last. Only the API
    # audits protocol errors; the others still answer them without echoing the request.
    plan: list[tuple[web.Application, str, int, object, Any]] = [
        (build_admin_app(api), server.admin_host, server.admin_port, None, None),
        (api, server.host, server.https_port, ssl_context, protocol_error_hook(api)),
    ]
    if server.http_port:
        plan.append((build_redirect_app(config), server.host, server.http_port, None, None))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        for app, host, port, context, hook in plan:
            runner = GatewayRunner(
                app,
                on_protocol_error=hook,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=10,
                # Room above the pipeline's own limits (token 8 KB, target 4 KB) so that those
                # refusals are JSON and audited, not the HTTP parser's bare 400.
                max_field_size=32768,
                max_line_size=16384,
            )
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port, ssl_context=context).start()  # type: ignore[arg-type]
        log.info("gateway.listening", https=f"https://{server.host}:{server.https_port}",
                 admin=f"http://{server.admin_host}:{server.admin_port}",
                 policy_revision=state.engine.revision)  # fmt: skip
        await stop.wait()
        log.info("gateway.stopping")
    finally:
        # Stop taking requests, finish in-flight ones, then drain the audit queue (cleanup_ctx).
        for started in reversed(runners):
            await started.cleanup()
    log.info("gateway.stopped")
    return 0
