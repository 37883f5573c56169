"""application/x-www-form-urlencoded bodies, parsed strictly (RFC 6749 section 3.2)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from gateway.pipeline import Denial

_MAX_FIELDS = 32


def parse_form(body: bytes) -> dict[str, str]:
    """The fields of a form body; a repeated field, bad UTF-8 or a NUL is auth.invalid_request."""
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=_MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise Denial("auth.invalid_request", "the form body is malformed") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            # "Parameters MUST NOT be included more than once": which copy counts is a guess.
            raise Denial("auth.invalid_request", f"parameter {name!r} is repeated")
        if "\x00" in value or "\x00" in name:
            raise Denial("auth.invalid_request", "the form body is malformed")
        fields[name] = value
    return fields
