"""The gateway's benchmark (`make bench`): throughput against a bare proxy, a constant-rate load
test, the identity provider (logins, refresh, bearer tokens), and micro-benchmarks of the policy
decision and schema validation.

Starts its own upstream, gateway and baseline proxies in a fresh temp directory (never var/) and
always stops them. Exits 0 when the bench ran, whatever the figures; a missed target is a
finding, reported, not a failure. Non-zero only when the bench itself could not run.

    .venv/bin/python bench/run.py [--quick] [--duration S] [--threads N] [--connections N]
    .venv/bin/python bench/run.py --only identity [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hotspots
import identity
import loadgen
import micro
import stack as bench_stack

if TYPE_CHECKING:
    import ssl

RATIO_TARGET = 0.75
ERROR_RATE_TARGET = 0.02
P95_LOAD_TARGET_MS = 300.0
P95_DESIGN_TARGET_MS = 5.0
DECIDE_P50_TARGET_US = 50.0
DECIDE_P99_TARGET_US = 300.0
SCHEMA_P50_TARGET_US = 100.0
MODEL_P50_TARGET_US = 500.0


GATEWAY = "gateway (TLS)"
BASELINE = "baseline (TLS)"


@dataclass(frozen=True)
class Target:
    """One server the closed loop drives: a label, its base URL and the headers it needs."""

    label: str
    base_url: str
    headers: dict[str, str]


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 5 s phases, fewer micro-benchmark calls"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of the 50 req/s load test (default 60, 5 with --quick)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds of each closed-loop run (default 15, 5 with --quick)",
    )
    # One wrk thread: on 2 cores shared with the gateway and the upstream, a second load
    # thread would only take CPU from the servers under test (not compared with -t2 yet).
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="default 32")
    parser.add_argument("--rate", type=float, default=50.0, help="load-test req/s (default 50)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument(
        "--only",
        choices=["identity"],
        default=None,
        help="run one part alone: 'identity' (logins, refresh grant, bearer tokens at 50 req/s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the gateway with py-spy in one extra closed-loop run",
    )
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 5.0 if args.quick else 60.0
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 15.0
    args.warmup = 1.0 if args.quick else 3.0
    args.micro_calls = 2_000 if args.quick else 20_000
    args.identity = identity.IdentitySettings.quick() if args.quick else identity.IdentitySettings()
    return args


def check_answers(url: str, headers: dict[str, str], context: ssl.SSLContext | None) -> None:
    """One GET must be 200 before any figure means something (a fast 404 is not a benchmark)."""
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - our own loopback URL
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:  # noqa: S310 - same
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    if status != 200:
        raise RuntimeError(f"GET {url} answered {status}, not 200: check the logs")


def closed_loop_phase(
    paths: list[str], targets: list[Target], settings: loadgen.LoadSettings
) -> dict[tuple[str, str], loadgen.ClosedLoopResult]:
    """Every path against every target, same tool and load; results by (path, target label)."""
    results = {}
    for path in paths:
        for target in targets:
            print(f"  {target.label:<18} GET {path} ...", end="", flush=True)
            result = loadgen.closed_loop(target.base_url + path, target.headers, settings)
            print(f" {result.rps:8.1f} req/s")
            results[path, target.label] = result
    return results


def profile_gateway(
    root: Path, gateway_pid: int, target: Target, path: str, settings: loadgen.LoadSettings
) -> None:
    """One extra closed-loop run on the gateway under py-spy, kept out of the table.

    The sampler takes CPU from the same 2 cores, so this run's throughput is not comparable.
    """
    executable = hotspots.py_spy()
    if executable is None:
        print("--profile: py-spy not found (.venv/bin/pip install py-spy); not profiling")
        return
    out = root / "gateway-stacks.txt"
    seconds = settings.warmup_seconds + settings.seconds
    process = hotspots.start_sampling(executable, gateway_pid, seconds, out)
    loadgen.closed_loop(target.base_url + path, target.headers, settings)
    _, errors = process.communicate(timeout=seconds + 30)
    if process.returncode != 0 or not out.exists():
        print(f"--profile: py-spy failed: {errors.strip()[-300:]}")
        return
    total, shares = hotspots.inclusive_shares(out)
    print(f"py-spy, {total} busy samples over all threads; the share of them with each function")
    print("on the stack (inclusive; the audit writer's DuckDB thread counts beside the loop):")
    for name, share in shares:
        print(f"  {share:6.1%}  {name}")
    print("innermost frames (self time), all functions:")
    for name, share in hotspots.self_shares(out):
        print(f"  {share:6.1%}  {name}")


def print_closed_loop(
    paths: list[str],
    targets: list[Target],
    results: dict[tuple[str, str], loadgen.ClosedLoopResult],
) -> list[str]:
    """The table, and one summary line per path."""
    summary = []
    print(f"\n{'request':<28}{'server':<18}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for path in paths:
        for target in targets:
            r = results[path, target.label]
            print(
                f"{path:<28}{target.label:<18}{r.rps:>9.1f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
                f"{r.errors:>8}"
            )
        gateway = results[path, GATEWAY]
        baseline = results[path, BASELINE]
        others = "; ".join(
            f"{t.label} {results[path, t.label].rps:.0f} req/s"
            for t in targets
            if t.label not in (GATEWAY, BASELINE)
        )
        ratio = gateway.rps / baseline.rps
        line = (
            f"gateway/baseline(TLS) req/s = {ratio:.2f} (target >= {RATIO_TARGET}: "
            f"{verdict(ratio >= RATIO_TARGET)})"
        )
        print(f"{'':<28}{line}\n")
        summary.append(
            f"GET {path}: gateway {gateway.rps:.0f} req/s (p50 {gateway.p50_ms:.1f} ms, p99 "
            f"{gateway.p99_ms:.1f} ms); baseline TLS {baseline.rps:.0f} req/s (p50 "
            f"{baseline.p50_ms:.1f}, p99 {baseline.p99_ms:.1f} ms); {others}; {line}"
        )
    return summary


def print_open_loop(result: loadgen.OpenLoopResult) -> str:
    """The load-test report, and its summary line."""
    error_rate = result.error_rate
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()))
    print(f"requests        {result.requests} ({statuses})")
    print(
        f"error rate      {error_rate:.2%}  (target < {ERROR_RATE_TARGET:.0%}: "
        f"{verdict(error_rate < ERROR_RATE_TARGET)})"
    )
    print(
        f"latency ms      P50 {result.p50_ms:.2f}  P95 {result.p95_ms:.2f}  "
        f"P99 {result.p99_ms:.2f}  max {result.max_ms:.2f}"
    )
    print(
        f"P95 target      < {P95_LOAD_TARGET_MS:g} ms (load test): "
        f"{verdict(result.p95_ms < P95_LOAD_TARGET_MS)}; <= {P95_DESIGN_TARGET_MS:g} ms "
        f"(design, authenticated request): {verdict(result.p95_ms <= P95_DESIGN_TARGET_MS)}"
    )
    print(f"generator lag   P99 {result.send_lag_p99_ms:.2f} ms behind schedule (client health)")
    return (
        f"{result.rate:g} req/s x {result.seconds:g} s (open loop): {result.requests} requests, "
        f"errors {error_rate:.2%} (< 2%: {verdict(error_rate < ERROR_RATE_TARGET)}), "
        f"P50/P95/P99 {result.p50_ms:.1f}/{result.p95_ms:.1f}/{result.p99_ms:.1f} ms "
        f"(P95 < 300 ms: {verdict(result.p95_ms < P95_LOAD_TARGET_MS)}; "
        f"P95 <= 5 ms: {verdict(result.p95_ms <= P95_DESIGN_TARGET_MS)})"
    )


def print_timings(timings: list[micro.Timing]) -> None:
    for t in timings:
        print(
            f"  {t.label:<36} p50 {t.p50_us:8.1f} us  p99 {t.p99_us:8.1f} us  "
            f"mean {t.mean_us:8.1f} us  ({t.calls} calls)"
        )


def micro_phase(calls: int) -> list[str]:
    """Policy and schema micro-benchmarks; their summary lines."""
    print(f"\n== Policy decision (embedded regopy, {micro.ENTRYPOINT}) ==")
    full, trimmed, memo_hit = micro.policy_timings(calls)
    print_timings([full, trimmed, memo_hit])
    decide_ok = full.p50_us <= DECIDE_P50_TARGET_US and full.p99_us <= DECIDE_P99_TARGET_US
    print(
        f"  targets p50 <= {DECIDE_P50_TARGET_US:g} us, p99 <= {DECIDE_P99_TARGET_US:g} us "
        f"(full input, evaluated): {verdict(decide_ok)}"
    )
    print("  where decide's time goes:")
    print_timings(micro.decide_breakdown(max(calls // 4, 500)))

    size, (check, parse_check) = micro.schema_timings(calls)
    print(
        f"\n== JSON Schema validation (ticket.json, {size}-byte record, Draft 2020-12 + formats) =="
    )
    print_timings([check, parse_check])
    schema_ok = check.p50_us <= SCHEMA_P50_TARGET_US
    print(f"  target p50 <= {SCHEMA_P50_TARGET_US:g} us (schema check): {verdict(schema_ok)}")
    size, (rules, stats, model, batched) = micro.ingest_timings(calls)
    print(f"\n== Ingest record checks (readings stream, {size}-byte record) ==")
    print_timings([rules, stats, model, batched])
    rules_ok = rules.p50_us <= SCHEMA_P50_TARGET_US
    model_ok = model.p50_us <= MODEL_P50_TARGET_US
    print(
        f"  targets p50 <= {SCHEMA_P50_TARGET_US:g} us (schema + rules): {verdict(rules_ok)}; "
        f"<= {MODEL_P50_TARGET_US:g} us with the model: {verdict(model_ok)}"
    )
    writer = micro.audit_writer_throughput(max(calls, 10_000))
    print(f"\n== Audit writer ({writer.events} events, emit + flush, batches of 2,000) ==")
    print(
        f"  encrypted (detail, user_agent, raw) {writer.encrypted_per_s:8.0f} events/s\n"
        f"  plaintext (bench-only baseline)     {writer.plain_per_s:8.0f} events/s\n"
        f"  ratio encrypted/plain {writer.ratio:.2f}"
    )
    return [
        (
            f"audit writer: {writer.encrypted_per_s:.0f} events/s encrypted, "
            f"{writer.plain_per_s:.0f} plain (ratio {writer.ratio:.2f})"
        ),
        (
            f"ingest record ({size} B): schema + rules p50 {rules.p50_us:.0f} us (<= 100 us: "
            f"{verdict(rules_ok)}); with statistics {stats.p50_us:.0f} us; with the HBOS model "
            f"p50 {model.p50_us:.0f} us one record per call (<= 500 us: {verdict(model_ok)}), "
            f"{batched.p50_us:.0f} us per record in a batch of 100"
        ),
        (
            f"policy decide (full input): p50 {full.p50_us:.0f} us, p99 {full.p99_us:.0f} us "
            f"(targets 50/300 us: {verdict(decide_ok)}); "
            f"trimmed input p50 {trimmed.p50_us:.0f} us, p99 {trimmed.p99_us:.0f} us; "
            f"memo hit p50 {memo_hit.p50_us:.0f} us, p99 {memo_hit.p99_us:.0f} us"
        ),
        (
            f"schema check ({size} B ticket): p50 {check.p50_us:.0f} us (<= 100 us: "
            f"{verdict(schema_ok)}); with strict parse p50 {parse_check.p50_us:.0f} us"
        ),
    ]


def run(root: Path, processes: ExitStack, args: argparse.Namespace) -> list[str]:
    """Every phase; the summary lines."""
    if args.only == "identity":
        return identity_only(root, processes, args)
    print(f"== Setting up in {root} ==")
    stack = bench_stack.prepare(root)
    # Before the gateway starts: a running gateway may hold the account store.
    bench_stack.add_user(stack, identity.USER, identity.PASSWORD, identity.ROLES)
    bench_stack.start_upstream(processes, stack)
    gateway_pid = bench_stack.start_gateway(processes, stack)
    tls_port = bench_stack.start_baseline(processes, stack, with_tls=True)
    plain_port = bench_stack.start_baseline(processes, stack, with_tls=False)
    ticket_id = bench_stack.create_ticket(stack)
    token = stack.mint(["reader"])
    # Every target gets the token, so wrk sends the same bytes to each; only the gateway reads it.
    bearer = {"Authorization": f"Bearer {token}"}
    targets = [
        Target(
            "upstream (direct)", stack.upstream_url, {**bearer, "X-Gateway-Secret": stack.secret}
        ),
        Target(BASELINE, f"https://127.0.0.1:{tls_port}", bearer),
        Target(GATEWAY, stack.gateway_url(""), bearer),
        Target("baseline (plain)", f"http://127.0.0.1:{plain_port}", bearer),
    ]
    paths = [f"/api/tickets/{ticket_id}", "/api/tickets?limit=10"]
    for target in targets:
        context = stack.ssl_context() if target.base_url.startswith("https") else None
        for path in paths:
            check_answers(target.base_url + path, target.headers, context)

    settings = loadgen.LoadSettings(args.threads, args.connections, args.seconds, args.warmup)
    tool = loadgen.closed_loop_tool()
    print(f"\n== Closed loop: {settings.describe(tool)} ==")
    print(
        f"   {os.cpu_count()} CPUs shared by the load generator, the server under test and the"
        " upstream; 'upstream (direct)' is the ceiling any proxy in front of it can reach"
    )
    results = closed_loop_phase(paths, targets, settings)
    summary = [f"closed loop: {settings.describe(tool)}"]
    summary += print_closed_loop(paths, targets, results)
    if args.profile:
        print(f"== Profile: the gateway under the same load, GET {paths[0]} ==")
        gateway = next(t for t in targets if t.label == GATEWAY)
        profile_gateway(root, gateway_pid, gateway, paths[0], settings)
        print()

    print(
        f"== Load test: {args.rate:g} req/s for {args.duration:g} s, open loop, through the "
        f"gateway, GET {paths[0]} (aiohttp, verifying TLS) =="
    )
    load = asyncio.run(
        loadgen.open_loop(
            stack.gateway_url(paths[0]),
            token,
            rate=args.rate,
            seconds=args.duration,
            ssl_context=stack.ssl_context(),
        )
    )
    summary.append(print_open_loop(load))
    summary += identity.identity_phase(stack, paths[0], args.identity, stack.ssl_context())
    summary += overhead_phase(root, processes, settings, profile=args.profile)
    summary += micro_phase(args.micro_calls)
    return summary


def identity_only(root: Path, processes: ExitStack, args: argparse.Namespace) -> list[str]:
    """`--only identity`: the upstream and the gateway (no baselines), then the identity part."""
    print(f"== Setting up in {root} (identity only) ==")
    stack = bench_stack.prepare(root)
    bench_stack.add_user(stack, identity.USER, identity.PASSWORD, identity.ROLES)
    bench_stack.start_upstream(processes, stack)
    bench_stack.start_gateway(processes, stack)
    path = f"/api/tickets/{bench_stack.create_ticket(stack)}"
    return identity.identity_phase(stack, path, args.identity, stack.ssl_context())


def overhead_phase(
    root: Path, processes: ExitStack, settings: loadgen.LoadSettings, *, profile: bool
) -> list[str]:
    """Gateway and baseline in front of a stub upstream that is never the bottleneck.

    In front of the EMP service both proxies are capped by its DuckDB reads, so their ratio
    says little about the gateway's own cost; here the ratio is the pipeline's overhead.
    """
    stub_root = root / "stub"
    stub_root.mkdir()
    stack = bench_stack.prepare(stub_root)
    bench_stack.start_stub_upstream(processes, stack)
    gateway_pid = bench_stack.start_gateway(processes, stack)
    tls_port = bench_stack.start_baseline(processes, stack, with_tls=True)
    bearer = {"Authorization": f"Bearer {stack.mint(['reader'])}"}
    targets = [
        Target("stub (direct)", stack.upstream_url, {**bearer, "X-Gateway-Secret": stack.secret}),
        Target(BASELINE, f"https://127.0.0.1:{tls_port}", bearer),
        Target(GATEWAY, stack.gateway_url(""), bearer),
    ]
    paths = ["/api/tickets/1"]
    for target in targets:
        context = stack.ssl_context() if target.base_url.startswith("https") else None
        check_answers(target.base_url + paths[0], target.headers, context)
    print("\n== Proxy overhead: the same proxies in front of a stub upstream (constant answer) ==")
    results = closed_loop_phase(paths, targets, settings)
    summary = [f"stub upstream: {line}" for line in print_closed_loop(paths, targets, results)]
    if profile:
        print(f"== Profile: the gateway in front of the stub upstream, GET {paths[0]} ==")
        profile_gateway(stub_root, gateway_pid, targets[2], paths[0], settings)
    return summary


def busy_warning() -> str:
    """A line on the machine's load: other work on 2 cores skews every figure here."""
    load = os.getloadavg()[0]
    note = "" if load < 0.5 else "  <- the machine is busy: figures will be low and noisy"
    return f"load average (1 min) {load:.2f}{note}"


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # SIGTERM (or a SIGINT that a background shell set to "ignore") must still unwind the
    # ExitStack, or the processes the bench started would outlive it.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="emp-bench-"))
    started = time.monotonic()
    load_before = busy_warning()
    print(f"before the bench: {load_before}")
    try:
        with ExitStack() as processes:
            summary = run(root, processes, args)
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; every process it started is stopped. Logs: {root}")
        return 130
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(
            f"\nbench: failed to run: {exc}\nbench: logs and configs kept in {root}",
            file=sys.stderr,
        )
        return 1
    if args.keep:
        print(f"\nlogs and configs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    header = (
        f"bench {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}, {os.cpu_count()} "
        f"CPUs, Python {platform.python_version()}, {time.monotonic() - started:.0f} s"
        f"{', --quick' if args.quick else ''}{f', --only {args.only}' if args.only else ''}"
    )
    print("\n== Summary ==")
    print(
        "\n".join(
            [header, f"- before the bench: {load_before}", *(f"- {line}" for line in summary)]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
