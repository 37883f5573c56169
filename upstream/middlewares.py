"""aiohttp middlewares: echo the request id, answer errors as JSON, trust only the gateway.

Each is a factory taking keyword-only config and returning the middleware. They must
never log or echo the gateway secret.
"""

import hmac
import logging
import re

import duckdb
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from empsecrets.fieldcrypt import DataKeyError
from upstream.errors import ApiError, ReasonId
from upstream.trust import TrustedSecrets

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Gateway-Secret"  # noqa: S105  # nosec B105  # a header name, not a secret
SUBJECT_HEADER = "X-Gateway-Subject"
REQUEST_ID_HEADER = "X-Request-Id"
SUBJECT = web.RequestKey("subject", str)

# Visible ASCII only and bounded: the id is echoed into a response header and logs.
_REQUEST_ID_SHAPE = re.compile(r"^[\x21-\x7e]{1,200}$")
_STATUS_REASONS = {
    404: ReasonId.NOT_FOUND,
    405: ReasonId.METHOD_NOT_ALLOWED,
    413: ReasonId.PAYLOAD_TOO_LARGE,
    415: ReasonId.UNSUPPORTED_MEDIA_TYPE,
}


def error_response(
    status: int, reason_id: ReasonId, message: str, request_id: str | None = None
) -> web.Response:
    """The one error body shape of the service.

    With the gateway's request id when it sent one: a refusal passed through the gateway then
    has the same shape as the gateway's own (error, reason_id, request_id).
    """
    body = {"error": message, "reason_id": reason_id}
    if request_id is not None:
        body["request_id"] = request_id
    return web.json_response(body, status=status)


def _request_id(request: web.Request) -> str | None:
    request_id = request.headers.get(REQUEST_ID_HEADER)
    if request_id is not None and _REQUEST_ID_SHAPE.match(request_id):
        return request_id
    return None


def request_id_echo() -> Middleware:
    """Copy a well-formed ``X-Request-Id`` onto the response so logs can be joined."""

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        request_id = _request_id(request)
        if request_id is not None:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return impl


def json_errors() -> Middleware:
    """Turn refusals, aiohttp HTTP errors and bugs into ``{"error", "reason_id"}`` answers."""

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return error_response(
                error.status, error.reason_id, error.message, _request_id(request)
            )
        except web.HTTPException as error:
            if error.status < 400:  # noqa: PLR2004  # redirects and 2xx are not errors
                raise
            reason_id = _STATUS_REASONS.get(error.status, ReasonId.BAD_REQUEST)
            return error_response(error.status, reason_id, error.reason, _request_id(request))
        except duckdb.Error:
            logger.exception("database error on %s %s", request.method, request.path)
            return error_response(
                500, ReasonId.INTERNAL_ERROR, "internal database error", _request_id(request)
            )
        except DataKeyError as error:
            # A sealed value that does not open: tampering, or a key missing from the ring.
            # Fail closed, and say which key (never a value) in the log only.
            logger.error("sealed value refused on %s %s: %s", request.method, request.path, error)  # noqa: TRY400  # the message is the story
            return error_response(
                500,
                ReasonId.INTERNAL_ERROR,
                "a stored value cannot be decrypted",
                _request_id(request),
            )

    return impl


def gateway_trust(
    *, secret: bytes | TrustedSecrets, open_routes: frozenset[tuple[str, str]]
) -> Middleware:
    """Refuse every request without the gateway's secret, except the listed (method, path).

    `secret` is one fixed secret, or the rotating set of upstream/trust.py.
    """
    if not secret:
        raise ValueError("the gateway secret must not be empty")
    if isinstance(secret, bytes):
        fixed = secret

        def accepts(presented: bytes) -> bool:
            return hmac.compare_digest(presented, fixed)

    else:
        accepts = secret.accepts

    @web.middleware
    async def impl(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in open_routes:
            return await handler(request)
        presented = request.headers.get(SECRET_HEADER)
        # Constant-time comparison: a timing side channel would leak the secret byte by byte.
        if presented is None or not accepts(presented.encode("utf-8", "surrogatepass")):
            logger.warning(
                "refused %s %s: reason_id=%s",
                request.method,
                request.path,
                ReasonId.UNTRUSTED_CALLER,
            )
            raise ApiError(
                401,
                ReasonId.UNTRUSTED_CALLER,
                f"missing or wrong {SECRET_HEADER}; only the gateway may call this service",
            )
        subject = request.headers.get(SUBJECT_HEADER)
        if subject:
            request[SUBJECT] = subject
        return await handler(request)

    return impl
