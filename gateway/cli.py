"""The `gateway` command: serve, certs, keys, token, policy, config, setup.

Every subcommand reads the same config file; a bad config exits 2 with the key named.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from empsecrets.providers import SecretError
from gateway import auditcrypt, keyring, keys, tls
from gateway.audit import record_offline, system_event
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.logs import configure_logging
from gateway.oidc import DiscoveryError
from gateway.policy import PolicyError
from gateway.workers import SUPERVISOR_ENV, WorkerSlot, check_worker_config, supervise

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
    except BrokenPipeError:
        # `gateway users list | head`: the reader left; not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (
        ConfigError, DiscoveryError, PolicyError, SecretError, FileNotFoundError, ValueError,
    ) as exc:  # fmt: skip
        print(f"gateway: {exc}", file=sys.stderr)  # noqa: T201
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="default: config/gateway.toml")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_serve(sub)

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
    init = key_cmd.add_parser(
        "init", help="create the signing key ring, the secret keys and the upstream secret"
    )
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(func=cmd_keys_init)
    rotate = key_cmd.add_parser(
        "rotate", help="make a new active signing key; older ones stay until their tokens expire"
    )
    rotate.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rotate.set_defaults(func=cmd_keys_rotate)
    show = key_cmd.add_parser("list", help="the signing keys: kid, algorithm, state, age")
    show.set_defaults(func=cmd_keys_list)

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
    ptest = policy.add_parser(
        "test", help="run the test_* rules, check the allow/deny matrix, measure line coverage"
    )
    ptest.add_argument("--dir", type=Path, default=None, help="default: policy.dir from config")
    ptest.add_argument("--matrix", type=Path, default=None, help="default: DIR/matrix.toml")
    ptest.add_argument("--routes", type=Path, default=None, help="default: routes.file from config")
    ptest.add_argument("--min-coverage", type=float, default=90.0, metavar="PERCENT",
                       help="fail below this Rego line coverage (default 90)")  # fmt: skip
    ptest.set_defaults(func=cmd_policy_test)
    preplay = policy.add_parser(
        "replay", help="re-evaluate recorded decisions against an edited policy; print the flips"
    )
    preplay.add_argument("--policies", type=Path, required=True, help="the candidate directory")
    preplay.add_argument("--since", default=None, help="only decisions this recent (24h, 7d, ...)")
    preplay.add_argument("--log", type=Path, default=None, help="default: decision_log.path")
    preplay.add_argument("--accept-widening", action="store_true",
                         help="exit 0 even when decisions flip from deny to allow")  # fmt: skip
    preplay.set_defaults(func=cmd_policy_replay)

    check = sub.add_parser("config", help="configuration").add_subparsers(
        dest="what", required=True
    )
    show = check.add_parser("check", help="validate the config, routes and policy; print a summary")
    show.set_defaults(func=cmd_config_check)
    _add_audit(sub)
    from gateway.identity.cli import register  # noqa: PLC0415 - kept beside the parser it extends
    from gateway.secrets.cli import register as register_secrets  # noqa: PLC0415
    from gateway.validation.cli import register as register_anomaly  # noqa: PLC0415

    register(sub)
    register_anomaly(sub)
    register_secrets(sub)
    return parser


def _add_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway in the foreground until SIGINT/SIGTERM")
    serve.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="with tls.enabled = false in production: listen in plain HTTP (warned, metered)",
    )
    serve.add_argument(
        "--workers", type=int, default=1,
        help="processes sharing the ports (SO_REUSEPORT); more than 1 needs Redis state",
    )  # fmt: skip
    serve.add_argument("--worker", help=argparse.SUPPRESS)  # "I/N": set by the supervisor
    serve.set_defaults(func=cmd_serve)


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="what", required=True
    )
    verify = audit.add_parser(
        "verify", help="walk the hash chains of an audit store; non-zero at the first broken link"
    )
    verify.add_argument("--db", type=Path, help="default: audit.db_path (stop the gateway first)")
    verify.set_defaults(func=cmd_audit_verify)
    from gateway.archive.cli import register  # noqa: PLC0415 - `archive run`: the trail's retention

    register(sub)


def cmd_setup(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Idempotent set-up: certificates, keys, secrets and the account store."""
    args.force = False
    cmd_certs_dev(config, args)
    cmd_keys_init(config, args)
    if config.identity.enabled and not config.identity.db_path.exists():
        from gateway.identity.accounts import AccountStore  # noqa: PLC0415

        AccountStore.open(config.identity.db_path).close()
        print(f"wrote {config.identity.db_path}")  # noqa: T201
    return 0


def cmd_audit_verify(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Verify every chain and checkpoint; print one line per chain; 1 when anything is broken."""
    import duckdb  # noqa: PLC0415 - only this command opens the store here

    from gateway.auditchain import verify  # noqa: PLC0415

    path = args.db or config.audit.db_path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no audit store")
    public = keys.checkpoint_key(config).public_key()
    cipher = auditcrypt.load_cipher(config)  # no ring: refused (exit 2)
    try:
        connection = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        raise ValueError(
            f"{path} is open in a running gateway ({exc}); verify a copy with --db, or ask the "
            "gateway: curl http://127.0.0.1:9464/audit/verify"
        ) from None
    with connection:
        reports = verify(connection, public, cipher)
    return print_chain_reports(reports)


def print_chain_reports(reports: list[Any]) -> int:
    """One line per chain and one per problem; the exit status (1 when anything is broken)."""
    for report in reports:
        state = "intact" if report.intact else f"BROKEN ({len(report.problems)} problems)"
        archived = f" (1-{report.archived_through} archived)" if report.archived_through else ""
        print(  # noqa: T201
            f"chain {report.chain}: {report.events} events, seq {report.first_seq}-"
            f"{report.last_seq}{archived}, {report.checkpoints} checkpoints: {state}"
        )
        for problem in report.problems:
            print(f"  {problem}")  # noqa: T201
    if not reports:
        print("no chained events")  # noqa: T201
    return 0 if all(report.intact for report in reports) else 1


def cmd_certs_dev(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Create the dev CA and server certificate."""
    written = tls.write_dev_certs(config.tls, force=args.force)
    for path in written:
        print(f"wrote {path}")  # noqa: T201
    if not written:
        print(f"certificates exist ({config.tls.cert_file}); --force replaces them")  # noqa: T201
    return 0


def cmd_keys_init(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Create the issuer's key ring, the upstream secret, and the keys read by reference.

    The session, TOTP, checkpoint and model keys go where their references point: the
    keystore by default (created on first use). --force replaces the session and TOTP keys.
    """
    issuer = config.issuer
    ring = keyring.keyring_path(issuer.key_dir)
    if args.force and ring.exists():
        ring.unlink()
    if keyring.ensure_keyring(issuer.key_dir, issuer.algorithm):
        print(f"wrote {ring}")  # noqa: T201
    if keys.ensure_upstream_secret(config.upstream.secret_file, force=args.force):
        print(f"wrote {config.upstream.secret_file}")  # noqa: T201
    for key in keys.gateway_keys(config):
        done = keys.provision_key(key, config.secrets, force=args.force)
        if done:
            print(done)  # noqa: T201
    # Never replaced by --force: a new ring could not open the audit store's values.
    if auditcrypt.provision(config):
        print(f"wrote {config.encryption.data_keys} (the audit store's data keys)")  # noqa: T201
    return 0


def cmd_keys_rotate(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Rotate the issuer's signing key (or show what a rotation would do) and audit it."""
    from gateway.app import retire_after_seconds  # noqa: PLC0415

    plan = keyring.rotate(
        config.issuer.key_dir,
        algorithm=config.issuer.algorithm,
        retire_after_seconds=retire_after_seconds(config),
        dry_run=args.dry_run,
    )
    summary = plan.public_summary()
    kind = "keys.rotation_planned" if args.dry_run else "keys.rotated"
    record_offline(
        config.audit.jsonl_path,
        config.audit.db_path,
        system_event(kind, subject=getpass.getuser(), **summary),
    )
    print(json.dumps({"dry_run": args.dry_run, **summary}, indent=2))  # noqa: T201
    if not args.dry_run:
        print("the running gateway signs with the new key within seconds")  # noqa: T201
    return 0


def cmd_keys_list(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Print the key ring without private parts."""
    now = time.time()
    for entry in keyring.load_keyring(config.issuer.key_dir):
        state = "retired" if entry.get("retired_at") else "active"
        age = int(now - entry.get("created_at", now))
        print(f"{entry['kid']}  {entry['alg']:<6} {state:<8} age {age}s")  # noqa: T201
    return 0


def cmd_token_mint(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Sign a token with the dev issuer's newest key and print it."""
    dev = config.issuer
    if not dev.enabled:
        raise ConfigError("issuer.enabled is false: this gateway mints no tokens")
    if config.server.environment == "production":
        raise ConfigError("`token mint` is for development; production tokens come from a login")
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
    private = keyring.load_keyring(dev.key_dir)[0]
    token = keys.mint_token(
        private, issuer=dev.issuer, audience=dev.audience, subject=args.sub,
        roles=args.role, ttl_seconds=ttl, extra_claims=extra,
    )  # fmt: skip
    print(token)  # noqa: T201
    return 0


def cmd_policy_test(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Rego tests, the allow/deny matrix, line coverage; non-zero when any of them falls short."""
    # regopy only when asked
    from gateway.policy import coverage, testing  # noqa: PLC0415
    from gateway.policy.embedded import EmbeddedPolicyEngine, PolicySources  # noqa: PLC0415
    from gateway.routes import load_routes  # noqa: PLC0415

    directory = args.dir or config.policy.dir
    results = testing.run_policy_tests(directory)
    for result in results:
        mark = "PASS" if result.passed else "FAIL"
        print(f"{mark} {result.module}: {result.name} {result.error}".rstrip())  # noqa: T201
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")  # noqa: T201

    sources = PolicySources.read(directory)
    routes = load_routes(args.routes or config.routes.file, config.routes.schema_dir)
    matrix = testing.load_matrix(
        args.matrix or directory / testing.MATRIX_FILE, routes, testing.defined_roles(sources)
    )
    engine = EmbeddedPolicyEngine(sources, config.policy.entrypoint)
    wrong = testing.check_matrix(engine, matrix.cells)
    for line in [*matrix.problems, *wrong]:
        print(f"FAIL matrix {line}")  # noqa: T201
    print(f"matrix: {len(matrix.cells)} cells checked, {len(wrong)} wrong, "  # noqa: T201
          f"{len(matrix.problems)} missing or stale")  # fmt: skip

    documents = [cell.document for cell in matrix.cells]
    report = coverage.measure_coverage(sources, documents, config.policy.entrypoint)
    for line in report.summary():
        print(line)  # noqa: T201
    low = report.percent < args.min_coverage
    mark = "FAIL coverage" if low else "coverage"
    print(f"{mark}: {report.percent:.1f}% of lines, minimum {args.min_coverage:g}%")  # noqa: T201
    return 1 if failed or not results or wrong or matrix.problems or low else 0


def cmd_policy_replay(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Replay recorded decisions against a candidate policy; 1 on deny->allow unless accepted."""
    from gateway.policy.decisionlog import read_log, segments  # noqa: PLC0415 - regopy only when asked
    from gateway.policy.embedded import EmbeddedPolicyEngine  # noqa: PLC0415
    from gateway.policy.replay import parse_duration, render, replay  # noqa: PLC0415

    since = parse_duration(args.since) if args.since else None
    log_file: Path = args.log or config.decision_log.path
    if not log_file.exists() and not segments(log_file):
        raise FileNotFoundError(f"{log_file}: no decision log (decision_log.path)")
    engine = EmbeddedPolicyEngine.from_directory(args.policies, config.policy.entrypoint)
    report = replay(read_log(log_file), engine, since=since)  # rotated segments too
    print(render(report, args.policies))  # noqa: T201
    if report.widened_count and not args.accept_widening:
        print("refused: decisions flip from deny to allow (review, then --accept-widening)")  # noqa: T201
        return 1
    return 0


def cmd_config_check(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Load everything serve would load, without listening."""
    from gateway.app import load_state  # noqa: PLC0415 - keeps `token mint` light

    state = load_state(config)
    if config.tls.enabled:
        tls.server_context(config.tls)
    auditcrypt.load_cipher(config)  # serve's store owner needs the data key ring
    print(f"config ok: {len(state.routes.routes)} routes, policy revision {state.engine.revision}")  # noqa: T201
    return 0


def cmd_serve(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Run until a signal; a missing policy, key, secret or certificate refuses to start."""
    production = config.server.environment == "production"
    try:
        plain = tls.listen_plain(
            config.tls, production=production, allow_plaintext=args.allow_plaintext
        )
    except tls.PlaintextRefused as exc:
        print(f"gateway: refusing to start: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.worker is None:
        check_worker_config(config, args.workers)
        if args.workers > 1:
            return supervise(
                config, args.config, workers=args.workers, allow_plaintext=args.allow_plaintext
            )
        slot = WorkerSlot(run_dir=config.server.run_dir)
    else:
        slot = WorkerSlot.parse(args.worker, config.server.run_dir)
    return asyncio.run(_serve(config, args.config, plain=plain, slot=slot))


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL) stops itself, draining as usual."""
    # The supervisor says who it is: a worker still starting when it died must notice too.
    parent = int(os.environ.get(SUPERVISOR_ENV, os.getppid()))
    while True:  # polled: Linux has no event for a parent's death short of prctl(PDEATHSIG)
        if os.getppid() != parent:
            break
        await asyncio.sleep(1.0)
    log.warning("workers.orphaned", supervisor=parent)
    stop.set()


async def _serve(
    config: GatewayConfig,
    config_file: Path | None = None,
    *,
    plain: bool = False,
    slot: WorkerSlot | None = None,
) -> int:
    from gateway.app import (  # noqa: PLC0415 - serve-only imports stay off `token mint`
        build_admin_app,
        build_app,
        build_redirect_app,
        load_state,
        protocol_error_hook,
    )
    from gateway.server import GatewayRunner  # noqa: PLC0415

    state = load_state(config, config_file)
    state.worker = slot or WorkerSlot(run_dir=config.server.run_dir)
    ssl_context = None if plain else tls.server_context(config.tls)
    if plain:
        # At every start, and as a metric, for as long as it lasts.
        log.warning("gateway.plaintext", environment=config.server.environment,
                    detail="tls.enabled is false: the API listens in plain HTTP; the session "
                           "cookie (Secure) will not be set by browsers")  # fmt: skip
        state.metrics.tls_enabled.set(0)
    api = build_app(state)
    server = config.server
    runners: list[web.AppRunner] = []
    # Admin first (health answers "not ready" until the API is up), redirect last. Only the API
    # audits protocol errors; the others still answer them without echoing the request.
    plan: list[tuple[web.Application, str, int, object, Any]] = []
    if state.worker.owner:  # with several workers, worker 0 answers for all (metrics added up)
        plan.append((build_admin_app(api), server.admin_host, server.admin_port, None, None))
    plan.append((api, server.host, server.https_port, ssl_context, protocol_error_hook(api)))
    if server.http_port and not plain:
        plan.append((build_redirect_app(config), server.host, server.http_port, None, None))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    orphan_watch = (
        asyncio.create_task(_stop_when_orphaned(stop), name="orphan-watch")
        if state.worker.shared
        else None
    )
    reloads: set[asyncio.Task[bool]] = set()

    def reload_policies() -> None:
        # SIGHUP: test and swap in the policy directory's current revision (or keep the old).
        if state.reloader is not None:
            task = loop.create_task(state.reloader.reload("sighup"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_policies)
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
            # Several workers bind the same ports; the kernel spreads the connections.
            reuse = state.worker.shared and port != server.admin_port
            site = web.TCPSite(runner, host, port, ssl_context=context, reuse_port=reuse or None)  # type: ignore[arg-type]
            await site.start()
        scheme = "http" if plain else "https"
        state.worker.mark_listening()
        admin = f"http://{server.admin_host}:{server.admin_port}" if state.worker.owner else None
        log.info("gateway.listening", api=f"{scheme}://{server.host}:{server.https_port}",
                 admin=admin, worker=f"{state.worker.index}/{state.worker.count}",
                 policy_revision=state.engine.revision)  # fmt: skip
        await stop.wait()
        if orphan_watch is not None:
            orphan_watch.cancel()
        log.info("gateway.stopping")
    finally:
        # Stop taking requests, finish in-flight ones, then drain the audit queue (cleanup_ctx).
        for started in reversed(runners):
            await started.cleanup()
    log.info("gateway.stopped")
    return 0
