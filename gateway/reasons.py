"""The reason-id catalogue: every refusal the gateway can give, with its HTTP status.

Reason ids are part of the API (clients and the SIEM key on them): add, never rename.
"""

from __future__ import annotations

from types import MappingProxyType

REASONS: MappingProxyType[str, int] = MappingProxyType(
    {
        "request.bad_path": 400,
        "request.bad_query": 400,
        "request.malformed_http": 400,
        "request.too_large": 413,
        "route.not_found": 404,
        "route.method_not_allowed": 405,
        "authn.missing_token": 401,
        "authn.malformed": 401,
        "authn.bad_signature": 401,
        "authn.expired": 401,
        "authn.not_yet_valid": 401,
        "authn.wrong_issuer": 401,
        "authn.wrong_audience": 401,
        "authn.unknown_kid": 401,
        "authn.alg_not_allowed": 401,
        "authn.missing_claim": 401,
        "authn.revoked": 401,
        "auth.invalid_request": 400,
        "auth.unsupported_grant_type": 400,
        "auth.invalid_scope": 400,
        "auth.invalid_client": 401,
        "auth.invalid_grant": 400,
        "auth.refresh_reused": 400,
        "auth.mfa_required": 401,
        "auth.mfa_failed": 400,
        "auth.mfa_state": 409,
        "auth.rate_limited": 429,
        "auth.locked_out": 429,
        "auth.unavailable": 503,
        "csrf.missing": 403,
        "csrf.mismatch": 403,
        "csrf.cross_origin": 403,
        "authz.denied": 403,
        "authz.engine_error": 403,
        "validation.schema": 422,
        "validation.rule": 422,
        "validation.outlier": 422,
        "validation.unknown_stream": 404,
        "validation.batch_too_large": 413,
        "validation.content_type": 415,
        "validation.malformed_json": 400,
        "upstream.timeout": 504,
        "upstream.unavailable": 502,
        "client.disconnected": 499,
        "internal.error": 500,
    }
)


def status_of(reason_id: str) -> int:
    """The HTTP status of a catalogued reason id; an uncatalogued id is a bug, not a 200."""
    return REASONS[reason_id]
