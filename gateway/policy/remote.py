"""The remote OPA engine: decisions from an OPA server's REST Data API, for sidecar deployments.

Fails closed: a timeout, a refused connection, a status other than 200, or an undefined or
malformed result is a PolicyError, and the caller denies. It never retries: a retry spends the
decision's budget on a server that has just failed.

Why one pooled aiohttp.ClientSession and not opa-python-client's AsyncOpaClient (DESIGN.md's
first choice; 3.0.0 read before deciding): it builds its own connector, so the pool cannot be
sized (`policy.opa_pool_size`); it takes host, port and `ssl=True|False`, so no path prefix and
no CA other than the system's; it retries 500/502/504 and lost connections with sleeps; and it
brings requests, urllib3 and aiofiles into the gateway for one POST.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import aiohttp

from gateway.oidc import is_safe_url
from gateway.policy import PolicyError, check_decision
from gateway.policy.dataapi import parse_json, read_capped

if TYPE_CHECKING:
    import ssl
    from types import TracebackType

    from gateway.pipeline import Decision

# A decision answer is a few hundred bytes; anything near this is not a decision.
MAX_ANSWER_BYTES = 1_000_000
_JSON = {"Content-Type": "application/json"}


class RemotePolicyEngine:
    """Asks OPA at url for the entrypoint's decision; start() opens the pool, close() ends it.

    `revision` is the OPA bundle revision of the last answer when OPA reports one (it does for
    bundles with a `.manifest` revision, asked with `?provenance=true`), else revision_label.
    """

    def __init__(
        self,
        url: str,
        *,
        entrypoint: str,
        timeout_ms: float,
        pool_size: int,
        revision_label: str = "opa-server",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not is_safe_url(url):
            # The input names the subject and OPA's answer lets requests through: neither may
            # cross a network in clear.
            raise PolicyError("OPA's URL must be https, or http to a loopback host")
        parts = urlsplit(url)
        if parts.username is not None or parts.query or parts.fragment:
            # Credentials in a URL end up in logs and error messages.
            raise PolicyError("OPA's URL must be a base URL: no credentials, query or fragment")
        if timeout_ms <= 0 or pool_size < 1 or not revision_label:
            raise PolicyError("the OPA timeout, pool size and revision label must be positive")
        base = url.rstrip("/")
        self.revision = revision_label
        self._label = revision_label
        self._url = base
        self._decision_url = f"{base}/v1/data/{entrypoint.strip('/')}?provenance=true"
        self._health_url = f"{base}/health"
        self._timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000.0)
        self._pool_size = pool_size
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool (inside the running loop, from a cleanup_ctx)."""
        connector = aiohttp.TCPConnector(
            limit=self._pool_size,
            limit_per_host=self._pool_size,
            keepalive_timeout=30,
            ssl=self._ssl,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        """Close the pool; later decisions fail closed."""
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def decide(self, document: dict[str, Any]) -> Decision:
        """Always a PolicyError: a network answer must be awaited (decide_async)."""
        del document
        raise PolicyError("the remote OPA engine answers through decide_async only")

    async def decide_async(self, document: dict[str, Any]) -> Decision:
        """The checked decision from OPA, or raise PolicyError."""
        session = self._session
        if session is None or session.closed:
            raise PolicyError("the remote OPA engine is not started (or already closed)")
        try:
            payload = json.dumps({"input": document}, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise PolicyError(f"the policy input is not JSON: {exc}") from None
        started = time.perf_counter()
        try:
            async with session.post(self._decision_url, data=payload, headers=_JSON) as response:
                status = response.status
                body = await read_capped(response.content, MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            name = type(exc).__name__
            raise PolicyError(f"OPA at {self._url} did not answer: {name} {exc}") from None
        eval_us = (time.perf_counter() - started) * 1e6
        answer = _answer_of(status, body)
        revision = self._revision_of(answer)
        self.revision = revision
        if "result" not in answer:
            raise PolicyError("decision is undefined")
        return check_decision(answer["result"], revision, eval_us)

    async def reachable(self) -> bool:
        """Whether OPA's `GET /health` answers 200 (for /readyz)."""
        session = self._session
        if session is None or session.closed:
            return False
        try:
            async with session.get(self._health_url) as response:
                return response.status == 200  # noqa: PLR2004 - HTTP OK
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _revision_of(self, answer: dict[str, Any]) -> str:
        """The bundle revision(s) in OPA's provenance, else the configured label."""
        provenance = answer.get("provenance")
        bundles = provenance.get("bundles") if isinstance(provenance, dict) else None
        revisions: list[tuple[str, str]] = []
        if isinstance(bundles, dict):
            for name, bundle in sorted(bundles.items()):
                revision = bundle.get("revision") if isinstance(bundle, dict) else None
                if isinstance(revision, str) and revision:
                    revisions.append((name, revision))
        if not revisions:
            return self._label
        if len(revisions) == 1:
            return revisions[0][1]
        return ",".join(f"{name}:{revision}" for name, revision in revisions)


def _answer_of(status: int, body: bytes | None) -> dict[str, Any]:
    """OPA's response body as an object; any other status or shape is a PolicyError."""
    if body is None:
        raise PolicyError(f"OPA's answer is over {MAX_ANSWER_BYTES} bytes")
    try:
        answer = parse_json(body)
    except (ValueError, RecursionError):
        answer = None
    if status != 200:  # noqa: PLR2004 - HTTP OK
        code = answer.get("code") if isinstance(answer, dict) else None
        raise PolicyError(f"OPA answered HTTP {status}" + (f" ({code})" if code else ""))
    if not isinstance(answer, dict):
        raise PolicyError("OPA's answer is not a JSON object")
    return answer
