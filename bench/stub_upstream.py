"""The bench's stub upstream: checks the gateway secret and answers a constant ticket.

It costs a few microseconds per request, so a proxy in front of it is measured by its own
overhead, not by the EMP service's DuckDB reads. Never run it outside the bench.

    python bench/stub_upstream.py --port P --secret-file F
"""

from __future__ import annotations

import argparse
import hmac
import json
from pathlib import Path

from aiohttp import web

from gateway import keys

TICKET = {
    "id": 1, "title": "bench", "description": "a ticket served by the stub upstream",
    "status": "open", "priority": "medium", "department_id": None, "assignee_id": None,
    "created_by": "bench", "created_at": "2026-11-22T20:00:00Z",
    "updated_at": "2026-11-22T20:00:00Z",
}  # fmt: skip


def build_app(secret: str) -> web.Application:
    """Any GET with the right secret gets the ticket; anything else 401."""
    body = json.dumps(TICKET).encode()
    expected = secret.encode()

    async def answer(request: web.Request) -> web.Response:
        given = request.headers.get("X-Gateway-Secret", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response({"error": "untrusted caller"}, status=401)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    args = parser.parse_args()
    app = build_app(keys.read_secret(args.secret_file))
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
