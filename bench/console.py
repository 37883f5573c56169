"""The admin console's figure (`make bench`): page render time with 10,000 audit rows.

Starts its own upstream and gateway in a fresh temp directory (never var/), fills the audit
store with 10,000+ events through the real request path (reads, refusals, ticket writes whose
titles are XSS payloads), signs an admin in with the login form, then loads each console page
one request after another over verifying TLS. Target: the audit page's P95 <= 50 ms.
Latency is the client's, from sending the request to the last byte of the page; the client
shares the 2 cores with the gateway and the upstream.

    .venv/bin/python bench/console.py [--quick] [--rows N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import stack as bench_stack
from loadgen import percentile

P95_TARGET_MS = 50.0
USER, PASSWORD = "bench-admin", "a long bench admin passphrase"
ORIGIN = "https://localhost:8443"  # the built-in issuer's origin: the login form's CSRF check


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls per page")
    parser.add_argument("--rows", type=int, default=10_000, help="audit events to fill first")
    parser.add_argument("--calls", type=int, default=None, help="loads per page (default 200)")
    return parser.parse_args()


async def fill_audit(stack: bench_stack.Stack, rows: int, session: aiohttp.ClientSession) -> float:
    """`rows` requests through the gateway, 32 at a time: allowed reads, refused deletes, and
    a ticket write in ten whose title is an XSS payload. Seconds taken."""
    reader = {"Authorization": f"Bearer {stack.mint(['reader'])}"}
    admin = {"Authorization": f"Bearer {stack.mint(['admin'])}"}
    ticket = bench_stack.create_ticket(stack)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(rows):
        queue.put_nowait(i)

    async def one(i: int) -> None:
        if i % 10 == 0:
            body = {"title": f"<img src=x onerror=alert({i})>", "description": "<b>bench</b>"}
            request = session.post(stack.gateway_url("/api/tickets"), json=body, headers=admin)
        elif i % 10 == 1:
            request = session.delete(stack.gateway_url(f"/api/tickets/{ticket}"), headers=reader)
        else:
            request = session.get(stack.gateway_url(f"/api/tickets/{ticket}"), headers=reader)
        async with request as response:
            await response.read()

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    return time.perf_counter() - started


async def sign_in(stack: bench_stack.Stack, session: aiohttp.ClientSession) -> str:
    """The login form, as a browser posts it: the session cookie for the Cookie header."""
    async with session.get(stack.gateway_url("/auth/login")) as page:
        login = page.cookies["__Host-emp_login"].value
    form = {"username": USER, "password": PASSWORD, "csrf_token": login}
    headers = {"Cookie": f"__Host-emp_login={login}", "Accept": "application/json",
               "Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}  # fmt: skip
    async with session.post(
        stack.gateway_url("/auth/login"), data=form, headers=headers, allow_redirects=False
    ) as answer:
        if answer.status != 200:
            raise RuntimeError(f"sign-in failed: {answer.status} {await answer.text()}")
        return f"__Host-emp_session={answer.cookies['__Host-emp_session'].value}"


async def time_page(
    stack: bench_stack.Stack, session: aiohttp.ClientSession, cookie: str, path: str, calls: int
) -> tuple[list[float], dict[str, int]]:
    """`calls` loads of one page, one after another: the latencies (ms) and the statuses."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    for _ in range(calls):
        started = time.perf_counter()
        async with session.get(stack.gateway_url(path), headers={"Cookie": cookie}) as response:
            await response.read()
            status = str(response.status)
        latencies.append((time.perf_counter() - started) * 1000.0)
        statuses[status] = statuses.get(status, 0) + 1
    return sorted(latencies), statuses


async def measure(stack: bench_stack.Stack, rows: int, calls: int) -> list[str]:
    connector = aiohttp.TCPConnector(ssl=stack.ssl_context(), limit=64)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        seconds = await fill_audit(stack, rows, session)
        stored = _audit_lines(stack)
        print(f"   filled the audit store: {rows} requests in {seconds:.1f} s; {stored} events")
        cookie = await sign_in(stack, session)
        pages = [
            ("/console/audit", "audit, newest 50 of all"),
            ("/console/audit?decision=deny&limit=50", "audit, refusals only"),
            ("/console/audit?route=tickets.create&limit=200", "audit, 200 ticket writes"),
            ("/console/policy", "policy status"),
            ("/console/secrets", "keys and secrets"),
            ("/console/quarantine", "quarantine (upstream call)"),
        ]
        await time_page(stack, session, cookie, "/console/audit", 10)  # warm-up
        print(f"\n   {'page':<28} {'calls':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  statuses")
        summary = []
        for path, label in pages:
            latencies, statuses = await time_page(stack, session, cookie, path, calls)
            p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
            print(f"   {label:<28} {calls:>5} {p50:>8.1f} {p95:>8.1f} {latencies[-1]:>8.1f}  "
                  f"{json.dumps(statuses)}")  # fmt: skip
            if path == "/console/audit":
                met = "met" if p95 <= P95_TARGET_MS and set(statuses) == {"200"} else "MISSED"
                summary.append(
                    f"console audit page with {stored} audit events: p50 {p50:.1f} ms, "
                    f"p95 {p95:.1f} ms (<= {P95_TARGET_MS:g} ms: {met})"
                )
            else:
                summary.append(f"console {label}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        return summary


def _audit_lines(stack: bench_stack.Stack) -> int:
    with (stack.root / "audit.jsonl").open("rb") as trail:
        return sum(1 for _ in trail)


def console_phase(root: Path, processes: ExitStack, *, rows: int, calls: int) -> list[str]:
    """Set up, fill, measure; the summary lines."""
    stack = bench_stack.prepare(root)
    bench_stack.add_user(stack, USER, PASSWORD, ["admin"])
    bench_stack.start_upstream(processes, stack)
    bench_stack.start_gateway(processes, stack)
    print(f"\n== Console: page render with {rows:,} audit rows (sequential, verifying TLS) ==")
    return asyncio.run(measure(stack, rows, calls))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    calls = args.calls or (50 if args.quick else 200)
    root = Path(tempfile.mkdtemp(prefix="emp-bench-console-"))
    try:
        with ExitStack() as processes:
            summary = console_phase(root, processes, rows=args.rows, calls=calls)
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; every process it started is stopped. Logs: {root}")
        return 130
    except (RuntimeError, OSError, ValueError, aiohttp.ClientError) as exc:
        print(f"\nbench: failed to run: {exc}\nbench: logs kept in {root}", file=sys.stderr)
        return 1
    shutil.rmtree(root, ignore_errors=True)
    print("\n== Summary (console) ==")
    print("\n".join(f"- {line}" for line in summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
