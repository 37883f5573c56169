"""Only the gateway may call: every route but GET /healthz needs X-Gateway-Secret."""

import pytest


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param(None, id="no header"),
        pytest.param("", id="empty"),
        pytest.param("not-the-secret-at-all", id="wrong"),
        pytest.param("{secret}x", id="secret with suffix"),
        pytest.param("{secret_prefix}", id="prefix of the secret"),
        pytest.param("{secret_upper}", id="different case"),
    ],
)
@pytest.mark.parametrize(
    "route",
    [
        pytest.param(("GET", "/api/tickets"), id="list"),
        pytest.param(("POST", "/api/ingest/clicks"), id="ingest"),
        pytest.param(("GET", "/api/no-such-route"), id="unknown route"),
        pytest.param(("POST", "/healthz"), id="healthz by POST"),
    ],
)
async def test_untrusted_caller_is_401_and_never_sees_the_secret(
    client, secret: str, request_id: str, presented: str | None, route: tuple[str, str]
) -> None:
    """A missing or wrong secret is 401 upstream.untrusted_caller, whatever the route."""
    headers = {"X-Request-Id": request_id}
    if presented is not None:
        headers["X-Gateway-Secret"] = presented.format(
            secret=secret, secret_prefix=secret[:-1], secret_upper=secret.upper()
        )
    response = await client.request(*route, headers=headers)
    text = await response.text()
    assert response.status == 401
    assert (await response.json())["reason_id"] == "upstream.untrusted_caller"
    assert secret not in text
    assert secret not in str(response.headers)
    assert response.headers["X-Request-Id"] == request_id


async def test_healthz_answers_without_the_secret_and_reveals_nothing(client) -> None:
    """GET /healthz is open and its body is exactly {"status": "ok"}."""
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_gateway_with_the_secret_is_let_through(api, request_id: str) -> None:
    """The right secret reaches the handler and the request id is echoed."""
    response = await api.call("GET", "/api/tickets")
    assert response.status == 200
    assert response.headers["X-Request-Id"] == request_id


async def test_malformed_request_id_is_not_echoed(api) -> None:
    """An X-Request-Id with spaces is not copied into the response."""
    response = await api.call("GET", "/api/tickets", headers={"X-Request-Id": "a b"})
    assert "X-Request-Id" not in response.headers


async def test_unknown_route_with_secret_is_json_404(api, request_id: str) -> None:
    """Routing errors use the same JSON error shape."""
    body = await api.json("GET", "/api/nothing-here", 404)
    assert body == {
        "error": "Not Found", "reason_id": "upstream.not_found", "request_id": request_id,
    }  # fmt: skip


async def test_errors_carry_the_gateways_request_id(api) -> None:
    """With the gateway's X-Request-Id, an error body has the gateway's shape: request_id too."""
    request_id = "0123456789abcdef0123456789abcdef"
    body = await api.json("GET", "/api/nothing-here", 404, headers={"X-Request-Id": request_id})
    assert body == {
        "error": "Not Found", "reason_id": "upstream.not_found", "request_id": request_id,
    }  # fmt: skip
    malformed = await api.json("GET", "/api/nothing-here", 404, headers={"X-Request-Id": "x" * 300})
    assert "request_id" not in malformed


async def test_wrong_method_is_json_405(api) -> None:
    """A method a route does not support is 405 upstream.method_not_allowed."""
    body = await api.json("PUT", "/api/tickets", 405)
    assert body["reason_id"] == "upstream.method_not_allowed"
