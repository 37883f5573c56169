"""The runner's contract: stages in order, a Denial answered as JSON, an unexpected exception
as 500 internal.error, and exactly one observation per request whatever happened."""

from __future__ import annotations

import pytest
from aiohttp import web

from gateway.pipeline import Denial, Pipeline, RequestContext


class Record:
    """A stage that notes its name and optionally refuses, fails or answers."""

    def __init__(self, name: str, seen: list[str], *, outcome: str = "go") -> None:
        self.name = name
        self._seen = seen
        self._outcome = outcome

    async def __call__(self, ctx: RequestContext) -> None:
        self._seen.append(self.name)
        if self._outcome == "deny":
            raise Denial("authz.denied", "no", pointer="/x")
        if self._outcome == "crash":
            raise RuntimeError("a bug, with a secret: s3cr3t")
        if self._outcome == "answer":
            ctx.response = web.json_response({"ok": True})


async def mount(aiohttp_client, pipeline: Pipeline):
    async def handler(request: web.Request) -> web.StreamResponse:
        return await pipeline(request)  # as app.py mounts it

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_client(app)


async def serve(aiohttp_client, stages):
    observed: list[RequestContext] = []
    return await mount(aiohttp_client, Pipeline(stages, observers=[observed.append])), observed


@pytest.mark.parametrize(
    ("outcomes", "status", "reason_id", "ran"),
    [
        (["go", "answer"], 200, "", ["a", "b"]),
        (["deny", "answer"], 403, "authz.denied", ["a"]),
        (["go", "crash", "answer"], 500, "internal.error", ["a", "b"]),
        (["go", "go"], 500, "internal.error", ["a", "b"]),
    ],
    ids=["answered", "denied_stops_the_pipeline", "unexpected_exception", "no_stage_answered"],
)
async def test_runner_answers_and_observes_once(aiohttp_client, outcomes, status, reason_id, ran):
    """Each outcome gets its status and reason id, and the observers see the request once."""
    seen: list[str] = []
    stages = [Record(name, seen, outcome=o) for name, o in zip("abc", outcomes, strict=False)]
    client, observed = await serve(aiohttp_client, stages)
    response = await client.get("/anything")
    body = await response.json()
    assert response.status == status
    assert seen == ran
    assert len(observed) == 1
    assert observed[0].reason_id == reason_id
    assert observed[0].status == status
    if reason_id:
        assert body["reason_id"] == reason_id
        assert body["request_id"] == observed[0].request_id
        assert "s3cr3t" not in await response.text()


async def test_denial_detail_reaches_the_body_and_the_observation(aiohttp_client):
    """A denial's detail (e.g. the JSON pointer) is in the answer and in the audited context."""
    client, observed = await serve(aiohttp_client, [Record("a", [], outcome="deny")])
    body = await (await client.get("/")).json()
    assert body["pointer"] == "/x"
    assert observed[0].detail["pointer"] == "/x"


async def test_a_failing_observer_does_not_break_the_answer_or_the_others(aiohttp_client):
    """An observer that raises is logged; the client still gets its answer, others still run."""
    seen: list[RequestContext] = []

    def broken(_ctx: RequestContext) -> None:
        raise ValueError("observer bug")

    pipeline = Pipeline([Record("a", [], outcome="answer")], observers=[broken, seen.append])
    client = await mount(aiohttp_client, pipeline)
    assert (await client.get("/")).status == 200
    assert len(seen) == 1
