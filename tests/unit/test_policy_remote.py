"""The OPA Data API of the admin port, and the remote engine asking it over real loopback HTTP.

No OPA binary can be installed here: the remote engine is tested against the gateway's own
OPA-compatible endpoint, and against small servers that answer what a broken OPA would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from support.stack import REPO

from gateway.policy import PolicyError
from gateway.policy.dataapi import add_data_api
from gateway.policy.embedded import EmbeddedPolicyEngine
from gateway.policy.remote import RemotePolicyEngine
from gateway.testing import free_port

ENTRYPOINT = "gateway/authz/decision"

# A policy of the tests' own, so the Data API's semantics do not move with the real RBAC.
TOY_REGO = """package gateway.authz

import rego.v1

default allow := false

allow if "admin" in input.subject.roles

default dry_run := false

dry_run if input.dry_run == true

reasons contains "toy.not_admin" if not allow

decision := {"allow": allow, "reasons": reasons, "dry_run": dry_run}

double(x) := x * 2
"""
# Two values for one complete rule whenever input.x is true: an evaluation error, not a value.
TOY_CONFLICT_REGO = """package toy.broken

import rego.v1

boom := 1 if input.x

boom := 2 if input.x
"""
TOY_DATA = {"toy": {"levels": ["low", "high"], "owner": {"name": "sec"}}}


@asynccontextmanager
async def serving(app: web.Application):
    """Serve app on a free loopback port; yield its base URL; always stop it."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def data_api_app(engine, policy_dir) -> web.Application:
    app = web.Application()
    add_data_api(app, lambda: engine, entrypoint=ENTRYPOINT, policy_dir=policy_dir)
    return app


def canned_opa(status: int, body: bytes, *, delay: float = 0.0) -> web.Application:
    """An 'OPA' that answers every decision with the same status and body, after delay."""

    async def answer(_request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post(f"/v1/data/{ENTRYPOINT}", answer)
    return app


def remote_for(url: str, **overrides) -> RemotePolicyEngine:
    settings = {"entrypoint": ENTRYPOINT, "timeout_ms": 2000.0, "pool_size": 4} | overrides
    return RemotePolicyEngine(url, **settings)


def document(roles, resource="tickets", action="read", sub="alice", **extra):
    return {
        "subject": {"sub": sub, "roles": roles, "amr": ["pwd"], "claims": {}},
        "request": {"method": "GET", "path": f"/api/{resource}", "segments": ["api", resource]},
        "route": {"name": f"{resource}.{action}", "resource": resource, "action": action},
        "time": {"now": "2026-11-22T20:00:00Z"},
        **extra,
    }


@pytest.fixture(scope="module")
def real_policies(tmp_path_factory):
    """A copy of policies/, so an edit in the work tree during the run cannot move the revision."""
    copy = tmp_path_factory.mktemp("real") / "policies"
    shutil.copytree(REPO / "policies", copy)
    return copy


@pytest.fixture(scope="module")
def real_engine(real_policies):
    return EmbeddedPolicyEngine.from_directory(real_policies, ENTRYPOINT)


@pytest.fixture
def toy_policies(tmp_path):
    directory = tmp_path / "toy"
    (directory / "gateway").mkdir(parents=True)
    (directory / "gateway" / "authz.rego").write_text(TOY_REGO)
    (directory / "toy").mkdir()
    (directory / "toy" / "broken.rego").write_text(TOY_CONFLICT_REGO)
    (directory / "data.json").write_text(json.dumps(TOY_DATA))
    return directory


@pytest.fixture
def toy_engine(toy_policies):
    return EmbeddedPolicyEngine.from_directory(toy_policies, ENTRYPOINT)


@pytest.fixture
async def real_api(real_engine, real_policies):
    async with serving(data_api_app(real_engine, real_policies)) as url:
        yield url


@pytest.fixture
async def toy_api(toy_engine, toy_policies):
    async with serving(data_api_app(toy_engine, toy_policies)) as url:
        yield url


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http, method: str, url: str, **kwargs):
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json()


# --- the remote engine against the gateway's own Data API -------------------------------------

DECISION_TABLE = [
    pytest.param(["admin"], "employees", "delete", True, id="admin_deletes_employees"),
    pytest.param(["reader"], "tickets", "read", True, id="reader_reads_tickets"),
    pytest.param(["ingest_process"], "ingest", "write", True, id="ingest_writes_stream"),
    pytest.param(["reader"], "tickets", "delete", False, id="reader_deletes_ticket"),
    pytest.param(["reader"], "employees", "delete", False, id="reader_deletes_employee"),
    pytest.param(["ingest_process"], "tickets", "read", False, id="ingest_reads_tickets"),
    pytest.param(["no_such_role"], "tickets", "read", False, id="unknown_role"),
    pytest.param([], "tickets", "read", False, id="no_roles"),
]


@pytest.mark.parametrize(("roles", "resource", "action", "allowed"), DECISION_TABLE)
async def test_remote_decides_as_the_embedded_engine(
    real_api, real_engine, roles, resource, action, allowed
):
    """Over HTTP, the remote engine's decision equals the embedded engine's, revision included."""
    doc = document(roles, resource, action)
    expected = real_engine.decide(doc)
    async with remote_for(real_api) as remote:
        decision = await remote.decide_async(doc)
    assert decision.allow is allowed
    assert (decision.allow, decision.reasons, decision.dry_run) == (
        expected.allow,
        expected.reasons,
        expected.dry_run,
    )
    assert decision.revision == real_engine.revision == remote.revision
    assert decision.eval_us > 0


async def test_remote_denies_a_document_without_subject(real_api):
    """A document with no subject comes back as a deny that carries the policy's reason."""
    async with remote_for(real_api) as remote:
        decision = await remote.decide_async({"route": {"resource": "tickets", "action": "read"}})
    assert decision.allow is False
    assert "rbac.no_subject" in decision.reasons


async def test_remote_carries_dry_run_from_the_policy(toy_api):
    """A decision's dry_run flag survives the round trip through the Data API."""
    async with remote_for(toy_api) as remote:
        decision = await remote.decide_async({"subject": {"roles": []}, "dry_run": True})
    assert (decision.allow, decision.dry_run, decision.reasons) == (False, True, ("toy.not_admin",))


async def test_server_down_is_a_policy_error():
    """Nothing listening on OPA's port: PolicyError, never a decision."""
    async with remote_for(f"http://127.0.0.1:{free_port()}") as remote:
        with pytest.raises(PolicyError, match="did not answer"):
            await remote.decide_async(document(["admin"]))
        assert await remote.reachable() is False


async def test_slow_server_is_a_policy_error_within_the_timeout():
    """An OPA that answers after the timeout is a PolicyError as soon as the timeout passes."""
    body = json.dumps({"result": {"allow": True, "reasons": []}}).encode()
    async with (
        serving(canned_opa(200, body, delay=2.0)) as url,
        remote_for(url, timeout_ms=150.0) as remote,
    ):
        started = time.monotonic()
        with pytest.raises(PolicyError, match="did not answer"):
            await remote.decide_async(document(["admin"]))
        assert time.monotonic() - started < 1.0


async def test_server_stalling_mid_body_is_a_policy_error():
    """Headers then silence: the timeout covers the body too, and the half answer is refused."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 200
        await response.prepare(request)
        await response.write(b'{"result": {"allow": true, ')
        await asyncio.sleep(2.0)
        return response

    app = web.Application()
    app.router.add_post(f"/v1/data/{ENTRYPOINT}", stall)
    async with serving(app) as url, remote_for(url, timeout_ms=200.0) as remote:
        with pytest.raises(PolicyError, match="did not answer"):
            await remote.decide_async(document(["admin"]))


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        pytest.param(200, b"{}", "undefined", id="undefined_result"),
        pytest.param(200, b'{"decision_id": "x"}', "undefined", id="undefined_with_decision_id"),
        pytest.param(200, b'{"result": true}', "not an object", id="result_is_bool"),
        pytest.param(200, b'{"result": null}', "not an object", id="result_is_null"),
        pytest.param(200, b'{"result": {"allow": "yes"}}', "allow", id="allow_is_string"),
        pytest.param(200, b'{"result": {"allow": 1, "reasons": []}}', "allow", id="allow_is_int"),
        pytest.param(200, b'{"result": {"reasons": []}}', "allow", id="allow_missing"),
        pytest.param(
            200, b'{"result": {"allow": true, "reasons": "x"}}', "reasons", id="reasons_string"
        ),
        pytest.param(
            200, b'{"result": {"allow": true, "reasons": [1]}}', "reasons", id="reasons_numbers"
        ),
        pytest.param(
            200,
            b'{"result": {"allow": true, "reasons": [], "dry_run": "no"}}',
            "dry_run",
            id="dry_run_string",
        ),
        pytest.param(200, b'{"result": {"allow": NaN}}', "not a JSON object", id="nan"),
        pytest.param(200, b"[]", "not a JSON object", id="body_is_array"),
        pytest.param(200, b"allow", "not a JSON object", id="body_not_json"),
        pytest.param(200, b"", "not a JSON object", id="body_empty"),
        pytest.param(
            200,
            b'{"result": {"allow": true, "reasons": ["' + b"x" * 1_100_000 + b'"]}}',
            "over",
            id="body_too_large",
        ),
        pytest.param(
            500, b'{"code": "internal_error", "message": "x"}', "HTTP 500", id="opa_error"
        ),
        pytest.param(
            404, b'{"result": {"allow": true, "reasons": []}}', "HTTP 404", id="allow_under_404"
        ),
        pytest.param(
            400, b'{"code": "invalid_parameter"}', "invalid_parameter", id="opa_refused_input"
        ),
    ],
)
async def test_malformed_answers_are_policy_errors(status, body, error):
    """Any answer other than a well-formed decision under 200 is a PolicyError naming the fault."""
    async with serving(canned_opa(status, body)) as url, remote_for(url) as remote:
        with pytest.raises(PolicyError, match=error):
            await remote.decide_async(document(["admin"]))


@pytest.mark.parametrize(
    ("provenance", "revision"),
    [
        pytest.param(None, "opa-sidecar", id="no_provenance_uses_label"),
        pytest.param({"version": "1.0"}, "opa-sidecar", id="no_bundles_uses_label"),
        pytest.param({"bundles": {"b": {}}}, "opa-sidecar", id="bundle_without_revision"),
        pytest.param({"bundles": {"b": {"revision": "r1"}}}, "r1", id="one_bundle"),
        pytest.param(
            {"bundles": {"z": {"revision": "r2"}, "a": {"revision": "r1"}}},
            "a:r1,z:r2",
            id="two_bundles_sorted",
        ),
    ],
)
async def test_revision_comes_from_provenance_or_the_label(provenance, revision):
    """OPA's bundle revision is used when it reports one; otherwise the configured label."""
    answer = {"result": {"allow": True, "reasons": []}}
    if provenance is not None:
        answer["provenance"] = provenance
    async with (
        serving(canned_opa(200, json.dumps(answer).encode())) as url,
        remote_for(url, revision_label="opa-sidecar") as remote,
    ):
        decision = await remote.decide_async(document(["admin"]))
    assert decision.revision == revision == remote.revision


async def test_connections_are_pooled_and_bounded():
    """Concurrent decisions share at most pool_size connections, reused across decisions."""
    peers: set[tuple[str, int]] = set()
    in_flight = 0
    most = 0

    async def answer(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        peers.add(request.transport.get_extra_info("peername"))
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.json_response({"result": {"allow": True, "reasons": []}})

    app = web.Application()
    app.router.add_post(f"/v1/data/{ENTRYPOINT}", answer)
    async with serving(app) as url, remote_for(url, pool_size=2) as remote:
        for _ in range(3):
            decisions = await asyncio.gather(
                *(remote.decide_async(document(["admin"])) for _ in range(6))
            )
            assert all(d.allow for d in decisions)
    assert most == 2
    assert len(peers) == 2


async def test_synchronous_decide_fails_closed(real_api):
    """The protocol's synchronous decide() refuses rather than block the loop on the network."""
    async with remote_for(real_api) as remote:
        with pytest.raises(PolicyError, match="decide_async"):
            remote.decide(document(["admin"]))


async def test_an_engine_not_started_or_closed_fails_closed(real_api):
    """Before start() and after close() every decision is a PolicyError."""
    remote = remote_for(real_api)
    with pytest.raises(PolicyError, match="not started"):
        await remote.decide_async(document(["admin"]))
    await remote.start()
    assert (await remote.decide_async(document(["admin"]))).allow is True
    await remote.close()
    with pytest.raises(PolicyError, match="not started"):
        await remote.decide_async(document(["admin"]))


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://opa.example:8181", id="plain_http_off_host"),
        pytest.param("ftp://127.0.0.1:8181", id="not_http"),
        pytest.param("http://127.0.0.1@attacker.example", id="userinfo_trick"),
        pytest.param("opa:8181", id="no_scheme"),
        pytest.param("https://svc:hunter2@opa.example", id="credentials"),
        pytest.param("http://127.0.0.1:8181/?pretty=true", id="query"),
    ],
)
def test_unsafe_opa_urls_are_refused(url):
    """Decisions never cross a network in clear, and OPA's URL carries no credentials."""
    with pytest.raises(PolicyError, match="OPA's URL") as refused:
        remote_for(url)
    assert "hunter2" not in str(refused.value)


async def test_reachable_follows_the_health_endpoint(real_api):
    """reachable() is True while the Data API's /health answers 200."""
    async with remote_for(real_api) as remote:
        assert await remote.reachable() is True


async def test_input_that_is_not_json_fails_closed(real_api):
    """A document JSON cannot carry (a NaN, a set) is a PolicyError before any request."""
    async with remote_for(real_api) as remote:
        for junk in ({"time": float("nan")}, {"roles": {"admin"}}):
            with pytest.raises(PolicyError, match="not JSON"):
                await remote.decide_async(junk)


# --- the Data API itself ----------------------------------------------------------------------


async def test_entrypoint_answers_the_checked_decision(toy_api, toy_engine, http):
    """POST on the entrypoint answers {"result": decision} with a decision_id, as OPA does."""
    url = f"{toy_api}/v1/data/{ENTRYPOINT}"
    status, body = await call(http, "POST", url, json={"input": {"subject": {"roles": ["admin"]}}})
    assert status == 200
    assert body["result"] == {"allow": True, "reasons": []}
    assert len(body["decision_id"]) == 32
    assert "provenance" not in body
    status, body = await call(
        http, "POST", url + "?provenance=true", json={"input": {"subject": {"roles": []}}}
    )
    assert body["result"] == {"allow": False, "reasons": ["toy.not_admin"]}
    assert body["provenance"] == {"bundles": {"gateway": {"revision": toy_engine.revision}}}


@pytest.mark.parametrize(
    ("method", "path", "payload", "expected"),
    [
        pytest.param(
            "POST", "gateway/authz/allow", {"subject": {"roles": ["admin"]}}, True, id="allow_true"
        ),
        pytest.param(
            "POST",
            "gateway/authz/allow",
            {"subject": {"roles": ["x"]}},
            False,
            id="allow_default_false",
        ),
        pytest.param("GET", "gateway/authz/allow", None, False, id="default_without_input"),
        pytest.param(
            "GET",
            "gateway/authz/decision",
            None,
            {"allow": False, "dry_run": False, "reasons": ["toy.not_admin"]},
            id="entrypoint_without_input",
        ),
        pytest.param(
            "POST",
            "gateway/authz/decision/allow",
            {"subject": {"roles": ["admin"]}},
            True,
            id="inside_a_rule_value",
        ),
        pytest.param("GET", "toy/owner", None, {"name": "sec"}, id="base_document"),
        pytest.param("GET", "toy/owner/name", None, "sec", id="base_leaf"),
        pytest.param("GET", "toy/levels/1", None, "high", id="array_index"),
        pytest.param("GET", "toy", None, {**TOY_DATA["toy"], "broken": {}}, id="base_and_virtual"),
        pytest.param(
            "GET",
            "gateway/authz/decision/",
            None,
            {"allow": False, "dry_run": False, "reasons": ["toy.not_admin"]},
            id="trailing_slash",
        ),
        pytest.param("POST", "gateway/authz/dry_run", {"dry_run": True}, True, id="other_rule"),
    ],
)
async def test_other_documents_are_answered_ad_hoc(toy_api, http, method, path, payload, expected):
    """Paths other than the entrypoint are evaluated as OPA would, rule defaults included."""
    kwargs = {"json": {"input": payload}} if method == "POST" else {}
    status, body = await call(http, method, f"{toy_api}/v1/data/{path}", **kwargs)
    assert status == 200, body
    assert body["result"] == expected


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("nope", id="unknown_top_level"),
        pytest.param("gateway/authz/nope", id="unknown_rule"),
        pytest.param("gateway/authz/double", id="function_is_not_a_document"),
        pytest.param("toy/broken/boom", id="conflict_not_triggered"),
        pytest.param("toy/levels/2", id="index_past_the_end"),
        pytest.param("toy/levels/x", id="non_numeric_index"),
        pytest.param("toy/owner/name/deeper", id="below_a_string"),
        pytest.param('gateway/authz/allow"]%3B true%3B x := ["', id="rego_injection"),
        pytest.param('toy"]["owner/name', id="quotes_stay_inside_one_key"),
        pytest.param("toy.owner/name", id="dot_in_segment_is_one_key"),
        pytest.param("gateway/authz/%E2%80%A8", id="unicode_separator"),
    ],
)
async def test_undefined_documents_have_no_result_key(toy_api, http, path):
    """An undefined document is 200 without "result", as OPA answers it, whatever the path holds."""
    status, body = await call(http, "POST", f"{toy_api}/v1/data/{path}", json={"input": {}})
    assert status == 200
    assert "result" not in body
    assert "decision_id" in body


async def test_input_never_leaks_into_a_later_query(toy_api, http):
    """A GET after a POST is evaluated without the POST's input."""
    url = f"{toy_api}/v1/data/gateway/authz/allow"
    _, first = await call(http, "POST", url, json={"input": {"subject": {"roles": ["admin"]}}})
    _, second = await call(http, "GET", url)
    assert (first["result"], second["result"]) == (True, False)


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        pytest.param(ENTRYPOINT, b"{", 400, "not valid JSON", id="bad_json"),
        pytest.param(ENTRYPOINT, b"\xff\xfe", 400, "not valid JSON", id="bad_utf8"),
        pytest.param(ENTRYPOINT, b'{"input": NaN}', 400, "not valid JSON", id="nan"),
        pytest.param(ENTRYPOINT, b"[]", 400, '"input"', id="body_array"),
        pytest.param(ENTRYPOINT, b'{"subject": {}}', 400, '"input"', id="input_missing"),
        pytest.param(ENTRYPOINT, b"", 400, "not valid JSON", id="body_empty"),
        pytest.param(ENTRYPOINT, b"[" * 100_000, 400, "not valid JSON", id="deep_nesting"),
        pytest.param("", b'{"input": {}}', 400, "data root", id="data_root"),
        pytest.param("gateway//authz", b'{"input": {}}', 400, "empty segment", id="empty_segment"),
        pytest.param("gateway/%01", b'{"input": {}}', 400, "control", id="control_character"),
    ],
)
async def test_bad_requests_are_400_in_opas_shape(toy_api, http, path, body, status, message):
    """A request OPA could not evaluate is invalid_parameter with a message naming the fault."""
    answer_status, answer = await call(
        http,
        "POST",
        f"{toy_api}/v1/data/{path}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert answer_status == status
    assert answer["code"] == "invalid_parameter"
    assert message in answer["message"]


async def test_get_with_input_parameter_is_refused(toy_api, http):
    """?input= is refused rather than silently evaluated without that input."""
    status, body = await call(http, "GET", f"{toy_api}/v1/data/gateway/authz/allow?input=%7B%7D")
    assert (status, body["code"]) == (400, "invalid_parameter")


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
async def test_bodies_over_the_limit_are_413(toy_api, http, chunked):
    """A body over 1 MB is refused, whether it announces its length or streams in chunks."""
    big = b'{"input": {"x": "' + b"a" * 1_100_000 + b'"}}'

    async def stream():
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    status, body = await call(
        http, "POST", f"{toy_api}/v1/data/{ENTRYPOINT}", data=stream() if chunked else big
    )
    assert (status, body["code"]) == (413, "invalid_parameter")


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        pytest.param("toy/broken/boom", {"x": True}, "evaluation failed", id="rule_conflict"),
        pytest.param(
            ENTRYPOINT, {"subject": {"roles": ["a\u0000dmin"]}}, "NUL", id="nul_in_input_fast_path"
        ),
        pytest.param("gateway/authz/allow", {"n": 2**70}, "64-bit", id="huge_integer_ad_hoc"),
    ],
)
async def test_engine_failures_are_500_internal_error(toy_api, http, path, payload, message):
    """What the engine cannot evaluate is OPA's 500 internal_error, never a result."""
    status, body = await call(http, "POST", f"{toy_api}/v1/data/{path}", json={"input": payload})
    assert (status, body["code"]) == (500, "internal_error")
    assert message in body["message"]
    assert "result" not in body


async def test_a_policy_edit_not_yet_loaded_stops_ad_hoc_answers(toy_api, toy_policies, http):
    """Once the files differ from the enforced revision, only the entrypoint is answered."""
    rego = toy_policies / "gateway" / "authz.rego"
    rego.write_text(rego.read_text().replace('"admin" in', '"reader" in'))
    payload = {"input": {"subject": {"roles": ["admin"]}}}
    status, body = await call(http, "POST", f"{toy_api}/v1/data/gateway/authz/allow", json=payload)
    assert (status, body["code"]) == (500, "internal_error")
    assert "enforces" in body["message"]
    status, body = await call(http, "POST", f"{toy_api}/v1/data/{ENTRYPOINT}", json=payload)
    assert (status, body["result"]["allow"]) == (200, True)


async def test_health_answers_200_with_an_empty_object(toy_api, http):
    """GET /health answers as OPA's does, so a remote engine can probe the gateway."""
    assert await call(http, "GET", f"{toy_api}/health") == (200, {})
