"""Turns DuckDB result rows into JSON-ready dicts; it must never query the database."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any


def json_value(value: object) -> object:
    """Timestamps are stored as naive UTC; answer them as RFC 3339 with ``Z``."""
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return value


def row_to_dict(names: Sequence[str], row: Sequence[Any]) -> dict[str, object]:
    """Pair column names with one row's values."""
    return {name: json_value(value) for name, value in zip(names, row, strict=True)}
