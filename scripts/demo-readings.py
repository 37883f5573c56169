#!/usr/bin/env python3
"""Feed the `readings` stream normal history through the gateway, as an ingest process would.

    .venv/bin/python scripts/demo-readings.py [--count 1000] [--batch 250]

Mints an ingest_process token with `gateway token mint` (development only) and posts batches
of plausible sensor readings (temperature ~ N(21, 2), humidity ~ N(45, 8), power tracking
temperature), so that the stream's baseline and `gateway anomaly train` have data to use.
Standard library only; verifies TLS with var/certs/ca.pem.
"""

from __future__ import annotations

import argparse
import json
import random
import ssl
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readings(count: int, rng: random.Random) -> list[dict[str, object]]:
    """`count` normal readings, one minute apart, ending now."""
    start = datetime.now(UTC) - timedelta(minutes=count)
    out = []
    for minute in range(count):
        temperature = rng.gauss(21, 2)
        out.append({
            "sensor": f"ab-{rng.randrange(1, 40)}",
            "at": (start + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "temperature": round(temperature, 2),
            "humidity": round(rng.gauss(45, 8), 2),
            "power_w": round(50 + 12 * temperature + rng.gauss(0, 5), 1),
            "latency_ms": round(rng.lognormvariate(3.0, 0.4), 1),
        })  # fmt: skip
    return out


def main() -> int:
    """Post the batches and print each receipt's counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--url", default="https://localhost:8443/api/ingest/readings")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "mint", "--sub", "demo-feed",
         "--role", "ingest_process"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    context = ssl.create_default_context(cafile=str(REPO / "var/certs/ca.pem"))
    records = readings(args.count, random.Random(args.seed))  # noqa: S311 - demo data
    for first in range(0, len(records), args.batch):
        request = urllib.request.Request(  # noqa: S310 - an https URL from the command line
            args.url,
            data=json.dumps(records[first : first + args.batch]).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, context=context) as response:  # noqa: S310
            receipt = json.load(response)
        counts = {k: receipt[k] for k in ("received", "accepted", "quarantined", "rejected")}
        print(json.dumps(counts))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
