"""The gateway's own reads from the upstream: a stream's statistics and its training features.

These calls carry the gateway's secret and a service subject ("gateway:baseline", ...), never a
client's identity. The upstream computes both in DuckDB over the stream's accepted records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from gateway.pipeline import new_request_id

if TYPE_CHECKING:
    from collections.abc import Callable


class UpstreamReadError(Exception):
    """The upstream did not answer a gateway read with a JSON object."""


async def get_json(
    session: aiohttp.ClientSession,
    base_url: str,
    secret: str,
    path: str,
    params: list[tuple[str, str]],
    *,
    subject: str,
    timeout_seconds: float = 10.0,
) -> dict[str, Any]:
    """GET a JSON object from the upstream as the gateway itself; raises UpstreamReadError."""
    headers = {
        "X-Gateway-Secret": secret,
        "X-Gateway-Subject": subject,
        "X-Gateway-Roles": "",
        "X-Request-Id": new_request_id(),
    }
    url = base_url.rstrip("/") + path
    try:
        async with session.get(
            url,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            allow_redirects=False,
        ) as response:
            if response.status != 200:  # noqa: PLR2004 - HTTP OK
                text = (await response.text())[:200]
                raise UpstreamReadError(f"{path}: HTTP {response.status}: {text}")
            document = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise UpstreamReadError(f"{path}: {type(exc).__name__}: {exc}"[:300]) from None
    if not isinstance(document, dict):
        raise UpstreamReadError(f"{path}: the answer is not a JSON object")
    return document


def stream_path(stream: str, tail: str) -> str:
    """/api/ingest/<stream>/<tail>, the stream name percent-encoded."""
    return f"/api/ingest/{quote(stream, safe='')}/{tail}"


@dataclass(frozen=True, slots=True)
class UpstreamReader:
    """The gateway's reads of stream data: the upstream session, its URL, the shared secret."""

    session: aiohttp.ClientSession
    base_url: str
    secret: Callable[[], str]  # the current shared secret (it may be rotated while we run)

    async def stats(
        self, stream: str, fields: tuple[str, ...], window_hours: int, max_records: int
    ) -> dict[str, Any]:
        """The stream's per-field summary over its recent accepted records."""
        params = [("field", name) for name in fields]
        params += [("window_hours", str(window_hours)), ("max_records", str(max_records))]
        return await get_json(
            self.session, self.base_url, self.secret(), stream_path(stream, "stats"), params,
            subject="gateway:baseline",
        )  # fmt: skip

    async def features(
        self, stream: str, fields: tuple[str, ...], window_hours: int, limit: int
    ) -> list[list[float]]:
        """Feature rows (every field a number) of the stream's recent accepted records."""
        params = [("field", name) for name in fields]
        params += [("window_hours", str(window_hours)), ("limit", str(limit))]
        document = await get_json(
            self.session, self.base_url, self.secret(), stream_path(stream, "features"), params,
            subject="gateway:anomaly-train", timeout_seconds=120.0,
        )  # fmt: skip
        rows = document.get("rows")
        if not isinstance(rows, list):
            raise UpstreamReadError("features: the answer has no 'rows' list")
        return rows
