"""OPA's REST Data API on the admin port, answered by the gateway's own embedded engine.

Other services ask the gateway as they would ask OPA (`POST /v1/data/{path}` with `{"input": ...}`
-> `{"result": ...}`). It never answers from a revision other than the one being enforced, and
any doubt is an error response in OPA's shape, never a guessed value.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import regopy
import structlog
from aiohttp import web

from gateway.policy import PolicyError
from gateway.policy.embedded import PolicySources, new_interpreter, read_output
from gateway.policy.regoinput import to_rego_input

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import aiohttp

    from gateway.pipeline import Decision
    from gateway.policy import PolicyEngine

log = structlog.get_logger("gateway.policy.dataapi")

# A decision input is a few KB; a bigger body is a mistake or an attack on memory.
MAX_BODY_BYTES = 1_000_000
# OPA's provenance names bundles; the gateway's policy directory is one bundle by this name.
BUNDLE_NAME = "gateway"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DataApiError(Exception):
    """A refusal in OPA's error shape: `{"code": ..., "message": ...}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def response(self) -> web.Response:
        """The error as OPA writes it."""
        body = {"code": self.code, "message": self.message}
        return web.json_response(body, status=self.status)


def bad_request(message: str) -> DataApiError:
    """OPA's 400 for a request it cannot evaluate."""
    return DataApiError(400, "invalid_parameter", message)


@dataclass(frozen=True)
class Answer:
    """One evaluation: whether the document is defined, its value, and the revision asked."""

    defined: bool
    value: Any
    revision: str


def add_data_api(
    app: web.Application,
    engine: Callable[[], PolicyEngine],
    *,
    entrypoint: str,
    policy_dir: Path,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Add `GET|POST /v1/data/{path}` and OPA's `GET /health` to app (the admin app)."""
    api = DataApi(
        engine, entrypoint=entrypoint, policy_dir=policy_dir, max_body_bytes=max_body_bytes
    )
    app.router.add_post("/v1/data/{path:.*}", api.post)
    app.router.add_get("/v1/data/{path:.*}", api.get)
    app.router.add_get("/health", api.health)


class DataApi:
    """The handlers: the entrypoint through the engine's compiled bundle, other paths ad hoc.

    An ad-hoc query compiles the policy again (~10 ms measured here), so it runs in a thread,
    one at a time, on a fresh interpreter: no input of one request can leak into the next.
    """

    def __init__(
        self,
        engine: Callable[[], PolicyEngine],
        *,
        entrypoint: str,
        policy_dir: Path,
        max_body_bytes: int,
    ) -> None:
        self._engine = engine  # a getter: a reload swaps the engine, the Data API follows
        self._entrypoint = tuple(entrypoint.split("/"))
        self._policy_dir = policy_dir
        self._max_body_bytes = max_body_bytes
        self._sources: PolicySources | None = None
        self._ad_hoc = asyncio.Lock()

    async def post(self, request: web.Request) -> web.Response:
        """Evaluate the document at the path for the body's input."""
        try:
            path = data_path(request.match_info["path"])
            body = await self._read_json(request)
            if not isinstance(body, dict) or "input" not in body:
                raise bad_request('the body must be a JSON object with an "input" key')
            answer = await self._evaluate(path, body["input"], has_input=True)
        except DataApiError as refusal:
            return refusal.response()
        return _respond(request, path, answer)

    async def get(self, request: web.Request) -> web.Response:
        """Evaluate the document at the path with no input."""
        try:
            path = data_path(request.match_info["path"])
            if "input" in request.query:
                # OPA reads ?input=; answering without it would look like an answer for it.
                raise bad_request("send the input as a POST body, not as ?input=")
            answer = await self._evaluate(path, None, has_input=False)
        except DataApiError as refusal:
            return refusal.response()
        return _respond(request, path, answer)

    async def health(self, _request: web.Request) -> web.Response:
        """OPA's health check: 200 once a policy revision is loaded."""
        if not self._engine().revision:
            return web.json_response({"error": "no policy loaded"}, status=500)
        return web.json_response({})

    async def _read_json(self, request: web.Request) -> Any:
        limit = self._max_body_bytes
        too_large = DataApiError(413, "invalid_parameter", f"the body is over {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = await read_capped(request.content, limit)
        if body is None:
            raise too_large
        try:
            return parse_json(body)
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"the body is not valid JSON: {exc}") from None

    async def _evaluate(self, path: tuple[str, ...], document: Any, *, has_input: bool) -> Answer:
        engine = self._engine()
        try:
            if has_input and path == self._entrypoint and isinstance(document, dict):
                decision = engine.decide(document)
                return Answer(
                    defined=True, value=decision_document(decision), revision=decision.revision
                )
            sources = await self._sources_of(engine.revision)
            async with self._ad_hoc:
                defined, value = await asyncio.to_thread(
                    query_document, sources, path, document, has_input=has_input
                )
            return Answer(defined=defined, value=value, revision=sources.revision)
        except PolicyError as exc:
            log.error("policy.data_api_error", path="/".join(path), error=str(exc))  # noqa: TRY400 - the message is the point
            raise DataApiError(500, "internal_error", str(exc)) from None

    async def _sources_of(self, revision: str) -> PolicySources:
        """The policy files of the enforced revision, read again only when the revision moves."""
        cached = self._sources
        if cached is not None and cached.revision == revision:
            return cached
        try:
            sources = await asyncio.to_thread(PolicySources.read, self._policy_dir)
        except (OSError, UnicodeError) as exc:
            raise PolicyError(f"{self._policy_dir}: unreadable: {exc}") from None
        if sources.revision != revision:
            # An edit on disk that is not (or not yet) loaded: answering from it would describe
            # a policy the gateway does not enforce.
            raise PolicyError(
                f"{self._policy_dir} holds revision {sources.revision}, the gateway enforces "
                f"{revision}: only the entrypoint is answered until they agree"
            )
        self._sources = sources
        return sources


def _respond(request: web.Request, path: tuple[str, ...], answer: Answer) -> web.Response:
    decision_id = uuid.uuid4().hex
    body: dict[str, Any] = {"decision_id": decision_id}
    if answer.defined:
        body["result"] = answer.value  # OPA leaves the key out when the document is undefined
    if _flag(request, "provenance"):
        body["provenance"] = {"bundles": {BUNDLE_NAME: {"revision": answer.revision}}}
    log.info(
        "policy.data_api",
        decision_id=decision_id,
        path="/".join(path),
        revision=answer.revision,
        defined=answer.defined,
    )
    return web.json_response(body)


def _flag(request: web.Request, name: str) -> bool:
    """OPA's boolean query parameters: `?name`, `?name=` and `?name=true` all mean yes."""
    values = request.query.getall(name, [])
    return values == [""] or any(value.lower() == "true" for value in values)


def data_path(raw: str) -> tuple[str, ...]:
    """The segments of the document's path under /v1/data/; 400 for a path OPA would not name."""
    if raw in {"", "/"}:
        # regopy's answer for `data` leaves out the base documents (data.json): refuse rather
        # than answer a partial document.
        raise bad_request("name a document under /v1/data/: the data root is not served")
    segments = tuple(raw.removesuffix("/").split("/"))
    for segment in segments:
        if not segment:
            raise bad_request(f"empty segment in the path {raw!r}")
        if _CONTROL.search(segment):
            raise bad_request("control characters in the path")
    return segments


def rego_ref(segments: tuple[str, ...]) -> str:
    """`data["a"]["b"]`: every segment a quoted string, so a path can never inject Rego."""
    # Rego string literals take JSON's escapes, so json.dumps gives one string token.
    return "data" + "".join(f"[{json.dumps(segment, ensure_ascii=False)}]" for segment in segments)


def query_document(
    sources: PolicySources, path: tuple[str, ...], document: Any, *, has_input: bool
) -> tuple[bool, Any]:
    """Evaluate the document at path on a fresh interpreter: (defined, value)."""
    interpreter = new_interpreter(sources)
    # regopy 1.5.2 answers `undefined` for a rule queried by its own name when only its
    # `default` applies (`data.p.allow` where OPA says false), but gets the enclosing object
    # right: ask for the parent and pick the last segment in Python.
    parent, last = (path[:-1], path[-1]) if len(path) > 1 else (path, None)
    try:
        if has_input:
            interpreter.set_input(to_rego_input(document))
        output = interpreter.query(rego_ref(parent))
        defined, value = read_document(output)
    except (regopy.RegoError, ValueError) as exc:
        # ValueError: regopy parses the output as JSON in Output() and a function ref is not.
        raise PolicyError(f"evaluation failed: {' '.join(str(exc).split())[:300]}") from None
    if not defined or last is None:
        return defined, value
    return child(value, last)


def read_document(output: Any) -> tuple[bool, Any]:
    """(False, None) for an undefined document, else (True, value); failures raise PolicyError."""
    # ok() first: str() of a failed Output segfaults regopy 1.5.2 (read_output knows this too).
    if output.ok() and str(output) == "undefined":
        return False, None
    return True, read_output(output)


def child(value: Any, key: str) -> tuple[bool, Any]:
    """The member of an object (or the element of an array) named by one path segment."""
    if isinstance(value, dict):
        return (True, value[key]) if key in value else (False, None)
    if isinstance(value, list) and key.isascii() and key.isdigit() and int(key) < len(value):
        return True, value[int(key)]
    return False, None


def decision_document(decision: Decision) -> dict[str, Any]:
    """The checked decision as the policy's answer shape: what `check_decision` reads back."""
    document: dict[str, Any] = {"allow": decision.allow, "reasons": list(decision.reasons)}
    if decision.dry_run:
        document["dry_run"] = True
    return document


async def read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it passes limit bytes (the rest is left unread)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity (which Python accepts and JSON does not) are refused."""
    return json.loads(body, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
