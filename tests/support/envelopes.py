"""Builds the gateway's validated batch envelope for the upstream tests, and posts it."""

import json
from typing import Any

from upstream.routes.common import DATABASE

ENVELOPE = {"Content-Type": "application/vnd.emp.ingest-batch+json"}
MODEL = "sensors@v0003"
FLAG = {"pointer": "/temperature", "rule": "stats.zscore", "message": "z-score 7.2 is above 4"}
FAILURE = {"pointer": "/lat", "rule": "lat_in_range", "message": "must be <= 90"}


def accepted(index: int, record: dict[str, Any], score: float | None = 0.1) -> dict[str, Any]:
    """An accepted entry of ``records``."""
    return {"index": index, "status": "accepted", "record": record, "score": score, "model": MODEL}


def quarantined(index: int, record: dict[str, Any], score: float | None = 9.1) -> dict[str, Any]:
    """A quarantined entry of ``records``, flagged by the z-score rule."""
    return {
        "index": index,
        "status": "quarantined",
        "record": record,
        "score": score,
        "model": MODEL,
        "flags": [FLAG],
    }


def rejected(index: int) -> dict[str, Any]:
    """An entry of ``rejected`` with one failure."""
    return {"index": index, "failures": [FAILURE]}


def envelope(records: list[dict[str, Any]], refused: list[dict[str, Any]] | None = None) -> dict:
    """An envelope whose ``received`` counts every entry of both lists."""
    refused = refused or []
    return {"received": len(records) + len(refused), "records": records, "rejected": refused}


async def post_envelope(api, stream: str, document: object, status: int = 201) -> Any:
    """POST an envelope (a document, or raw bytes) and return the JSON answer."""
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return await api.json("POST", f"/api/ingest/{stream}", status, data=body, headers=ENVELOPE)


async def sql(api, query: str, params: list[object] | None = None) -> list[tuple[Any, ...]]:
    """Rows of one query run on the app's own database, on its writer thread."""
    database = api.client.app[DATABASE]
    return await database.write(lambda cursor: cursor.execute(query, params or []).fetchall())
