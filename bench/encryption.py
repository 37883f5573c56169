"""Encryption at rest, the EMP service's figure (`make bench`): the ticket list, sealed vs plain.

Two copies of one database with 10,000 tickets (title and description filled): one written
through the real sealer, one by a pass-through sealer used only here (production code has
no way to turn sealing off). Each is served by the real EMP app over loopback HTTP, and
`GET /api/tickets?limit=100` is called one request after another. Reported: requests per
second and P95 of each, and the ratio sealed / plain. The store-level cost (one page read
and opened, no HTTP) is printed too. The gateway's audit-writer ratio is printed by
bench/audit_encryption.py.

    .venv/bin/python bench/encryption.py [--quick] [--rows N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp.test_utils import TestClient, TestServer

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from empsecrets.fieldcrypt import DataKeyRing, FieldCipher  # noqa: E402
from upstream.app import create_app  # noqa: E402
from upstream.cli import main as upstream_main  # noqa: E402
from upstream.config import DatabaseConfig, TrustConfig, UpstreamConfig  # noqa: E402
from upstream.routes.common import DATABASE  # noqa: E402
from upstream.schema import TICKETS  # noqa: E402
from upstream.sealing import Sealer  # noqa: E402
from upstream.store.resources import ResourceStore  # noqa: E402


class PlainSealer(Sealer):
    """Stores and returns values as they are: the baseline, never used outside this bench."""

    def seal_values(
        self, _table: str, _row_id: int, values: Mapping[str, object]
    ) -> dict[str, object]:
        """The values as they are."""
        return dict(values)

    def open_row(self, _table: str, row: dict[str, object]) -> dict[str, object]:
        """The row as it is."""
        return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--rows", type=int, default=10_000, help="tickets in the table")
    parser.add_argument("--calls", type=int, default=None, help="list calls (default 400)")
    return parser.parse_args()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def fill(app: web.Application, rows: int) -> None:
    """`rows` tickets through the store (the sealer the app was given), 500 per transaction."""
    database = app[DATABASE]
    store = ResourceStore(TICKETS)
    sealer = database.sealer
    text = "Printer on floor 3 jams on duplex; model LX-" + "x" * 60
    for start in range(0, rows, 500):

        def batch(cursor: Any, start: int = start) -> None:
            for n in range(start, min(rows, start + 500)):
                store.insert(cursor, sealer, {"title": f"ticket {n}", "description": text,
                                              "status": "open", "priority": "medium",
                                              "department_id": None, "assignee_id": None},
                             "bench")  # fmt: skip

        await database.write(batch)


async def measure(
    config: UpstreamConfig, sealer: Sealer | None, rows: int, calls: int
) -> dict[str, float]:
    app = create_app(config)
    if sealer is not None:
        # Swap the sealer in before the database opens (the cleanup context reads it).
        async def use_plain(app: web.Application) -> None:
            app[DATABASE].sealer = sealer

        app.on_startup.append(use_plain)
    secret = (config.trust.secret_file).read_text().strip()
    headers = {"X-Gateway-Secret": secret, "X-Gateway-Subject": "bench", "X-Request-Id": "b"}
    async with TestClient(TestServer(app)) as client:
        await fill(app, rows)
        database, store = app[DATABASE], ResourceStore(TICKETS)
        started = time.perf_counter()
        for _ in range(50):
            await database.read(lambda cursor: store.list_page(cursor, database.sealer, {}, 100, 0))
        store_ms = (time.perf_counter() - started) / 50 * 1000
        for _ in range(20):  # warm-up
            await client.get("/api/tickets?limit=100", headers=headers)
        latencies = []
        started = time.perf_counter()
        for call in range(calls):
            offset = (call * 100) % max(1, rows - 100)
            sent = time.perf_counter()
            response = await client.get(f"/api/tickets?limit=100&offset={offset}", headers=headers)
            body = await response.json()
            latencies.append((time.perf_counter() - sent) * 1000)
            if response.status != 200 or len(body["items"]) != 100:
                raise RuntimeError(f"unexpected answer: {response.status} {body}")
        elapsed = time.perf_counter() - started
    return {
        "rps": calls / elapsed,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "store_ms": store_ms,
    }


def make_database(root: Path) -> UpstreamConfig:
    root.mkdir(parents=True)
    db = root / "emp.duckdb"
    if upstream_main(["db", "init", "--db", str(db)]) != 0:
        raise RuntimeError("db init failed")
    secret_file = root / "secrets" / "upstream.secret"
    secret_file.write_text(secrets.token_urlsafe(32) + "\n")
    secret_file.chmod(0o600)
    return UpstreamConfig(
        database=DatabaseConfig(path=db), trust=TrustConfig(secret_file=secret_file)
    )


def main() -> int:
    args = parse_args()
    calls = args.calls or (100 if args.quick else 400)
    work = Path(tempfile.mkdtemp(prefix="bench-encryption-"))
    try:
        sealed_config = make_database(work / "sealed")
        plain_config = make_database(work / "plain")
        plain = PlainSealer(FieldCipher(DataKeyRing.generate()))
        # Alternate runs so that machine noise hits both sides alike; keep each side's best.
        results: dict[str, list[dict[str, float]]] = {"sealed": [], "plain": []}
        for _ in range(2):
            results["plain"].append(asyncio.run(measure(plain_config, plain, args.rows, calls)))
            results["sealed"].append(asyncio.run(measure(sealed_config, None, args.rows, calls)))
            args.rows = 0  # filled once: later runs read the same tables
        best = {side: max(runs, key=lambda r: r["rps"]) for side, runs in results.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for side in ("plain", "sealed"):
        r = best[side]
        print(f"EMP ticket list ({side:6}): {r['rps']:7.1f} req/s  p50 {r['p50']:5.2f} ms"
              f"  p95 {r['p95']:5.2f} ms  store page {r['store_ms']:5.2f} ms")  # fmt: skip
    ratio = best["sealed"]["rps"] / best["plain"]["rps"]
    store_ratio = best["plain"]["store_ms"] / best["sealed"]["store_ms"]
    print(f"sealed / plain throughput, GET /api/tickets?limit=100 over HTTP: {ratio:.2f}"
          f"  (store page alone: {store_ratio:.2f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
