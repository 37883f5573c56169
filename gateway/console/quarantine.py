"""The console's calls to the EMP service's quarantine: list a stream's records, review one.

Each call carries the gateway's secret and the acting user as subject (the upstream records
who reviewed), with the console request's id so both logs join. Never shows a stream's
sensitive fields: they are masked before a record reaches a template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.validation.records import json_pointer
from gateway.validation.upstream_api import stream_path

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.pipeline import Principal
    from gateway.validation.streams import StreamSpec

STATUSES = ("pending", "accepted", "discarded", "all")
MASK = "***"


class UpstreamCallError(Exception):
    """The EMP service did not answer with JSON (down, timed out, or a broken answer)."""


class QuarantineClient:
    """Reads and reviews a stream's quarantine on the upstream, as the signed-in user."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        secret: Callable[[], str],
        timeout_seconds: float = 10.0,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._secret = secret  # the current shared secret: it may be rotated while we run
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def records(
        self, stream: str, status: str, limit: int, *, actor: Principal, request_id: str
    ) -> tuple[int, dict[str, Any]]:
        """The upstream's status and answer for a page of the stream's quarantine."""
        params = {"status": status, "limit": str(limit)}
        path = stream_path(stream, "quarantine")
        return await self._call("GET", path, actor, request_id, params=params)

    async def review(
        self,
        stream: str,
        item_id: str,
        decision: str,
        note: str | None,
        *,
        actor: Principal,
        request_id: str,
    ) -> tuple[int, dict[str, Any]]:
        """Accept or discard one record; the upstream's status and answer (409: already done)."""
        path = stream_path(stream, f"quarantine/{item_id}/{decision}")
        body = {"note": note} if note else {}
        return await self._call("POST", path, actor, request_id, body=body)

    async def _call(
        self,
        method: str,
        path: str,
        actor: Principal,
        request_id: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        headers = {
            "X-Gateway-Secret": self._secret(),
            "X-Gateway-Subject": actor.sub,
            "X-Gateway-Roles": ",".join(actor.roles),
            "X-Request-Id": request_id,
        }
        try:
            async with self._session.request(
                method, self._base_url + path, params=params, json=body, headers=headers,
                timeout=self._timeout, allow_redirects=False,
            ) as response:  # fmt: skip
                document = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamCallError(type(exc).__name__) from None
        if not isinstance(document, dict):
            raise UpstreamCallError("the answer is not a JSON object")
        return status, document


def masked_record(record: Any, spec: StreamSpec | None, path: tuple[Any, ...] = ()) -> Any:
    """The record with the stream's sensitive fields (JSON pointers) shown as ***."""
    if spec is None or not spec.sensitive:
        return record
    if path and spec.is_sensitive(json_pointer(list(path))):
        return MASK
    if isinstance(record, dict):
        return {key: masked_record(value, spec, (*path, key)) for key, value in record.items()}
    if isinstance(record, list):
        return [masked_record(value, spec, (*path, i)) for i, value in enumerate(record)]
    return record
