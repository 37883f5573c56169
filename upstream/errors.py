"""The one catalogue of reason ids and the two error families of the service.

`ApiError` is an expected refusal that becomes a JSON answer; `SetupError` stops the
start with a message for the operator. Neither may ever carry a secret in its message.
"""

from enum import StrEnum


class ReasonId(StrEnum):
    """Stable, dotted reason ids that clients and the gateway's audit log may rely on."""

    UNTRUSTED_CALLER = "upstream.untrusted_caller"
    BAD_REQUEST = "upstream.bad_request"
    NOT_FOUND = "upstream.not_found"
    METHOD_NOT_ALLOWED = "upstream.method_not_allowed"
    CONFLICT = "upstream.conflict"
    PAYLOAD_TOO_LARGE = "upstream.payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "upstream.unsupported_media_type"
    BUSY = "upstream.busy"
    INTERNAL_ERROR = "upstream.internal_error"


class ApiError(Exception):
    """An expected refusal: the error middleware turns it into ``{"error", "reason_id"}``."""

    def __init__(self, status: int, reason_id: ReasonId, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason_id = reason_id
        self.message = message


def bad_request(message: str) -> ApiError:
    """Build a 400 refusal; the message names the field or parameter at fault."""
    return ApiError(400, ReasonId.BAD_REQUEST, message)


def not_found(message: str) -> ApiError:
    """Build a 404 refusal."""
    return ApiError(404, ReasonId.NOT_FOUND, message)


def conflict(message: str) -> ApiError:
    """Build a 409 refusal for a uniqueness or reference rule."""
    return ApiError(409, ReasonId.CONFLICT, message)


class SetupError(Exception):
    """A problem the operator must fix before the service can start or migrate."""


class ConfigError(SetupError):
    """The config file or a flag is invalid; the message names the key."""


class MigrationError(SetupError):
    """The database schema is not in a state the service can use or migrate."""


class SecretError(SetupError):
    """The shared gateway secret cannot be loaded."""
