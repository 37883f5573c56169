"""Checks record field names sent in query strings and turns them into DuckDB JSON paths.

A field reaches SQL only as a bound JSON path built from checked parts: it must never be
spliced into SQL text, and its shape leaves no room for quotes, brackets or wildcards.
"""

import re

from multidict import MultiMapping

from upstream.errors import bad_request

MAX_FIELDS = 32
# Up to 8 dotted identifiers: "temperature", "location.lat".
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}$")


def json_path(field: str) -> str:
    """The DuckDB JSON path of a checked field name: ``location.lat`` is ``$.location.lat``."""
    return f"$.{field}"


def parse_fields(query: MultiMapping[str]) -> list[str]:
    """The repeated ``field`` parameters: 1 to MAX_FIELDS distinct, checked names, in order."""
    fields = query.getall("field", [])
    if not 1 <= len(fields) <= MAX_FIELDS:
        raise bad_request(f"give 1 to {MAX_FIELDS} 'field' query parameters, e.g. ?field=temp")
    for position, field in enumerate(fields, start=1):
        # fullmatch: `$` alone would also accept a trailing newline.
        if not FIELD_NAME.fullmatch(field):
            raise bad_request(
                f"query parameter 'field' number {position} is not a field name: use dotted"
                " names of letters, digits and '_'"
                " (each starting with a letter or '_', at most 64 characters, at most 8 parts),"
                " e.g. location.lat"
            )
    if len(set(fields)) != len(fields):
        raise bad_request("query parameter 'field' names the same field more than once")
    return fields
