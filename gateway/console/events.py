"""The console's reads of the audit trail, and how an event is shown.

Searches are `gateway.auditsearch.search_events` (the same filters and cursor as GET
/admin/audit, wherever the store is). An
event is turned into strings for the templates here; none of them is marked safe except a
ticket description, which is sanitised on the way out.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.auditsearch import SEALED_DETAIL

# Routes whose `description` change is a ticket description: the one field that allows markup.
MARKUP_ROUTES = frozenset({"tickets.create", "tickets.replace", "tickets.update"})
_RAW_CHARS = 4000  # the raw JSON shown per event; the export (GET /admin/audit) has it whole


def as_text(value: Any) -> str:
    """A value as the page shows it: strings as they are, anything else as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False, sort_keys=True)


def event_view(event: dict[str, Any]) -> dict[str, Any]:
    """What the audit page shows of one event; every string is escaped by the template.

    The store-only detail (values of fields the EMP service seals, "***" in the chained
    event) is shown in their place; the raw JSON stays the chained event's.
    """
    private = _mapping(event.get(SEALED_DETAIL))
    chained = {k: v for k, v in event.items() if k != SEALED_DETAIL}
    detail = {**_mapping(event.get("detail")), **private}
    changes = {
        **_mapping(_mapping(event.get("detail")).get("changes")),
        **_mapping(private.get("changes")),
    }
    description = changes.get("description")
    raw = json.dumps(chained, indent=1, sort_keys=True, ensure_ascii=False)
    return {
        **{name: as_text(event.get(name)) for name in _COLUMNS},
        "roles": ", ".join(str(r) for r in event.get("roles") or []),
        "detail": [(k, as_text(v)) for k, v in sorted(detail.items()) if k != "changes"],
        "changes": [(k, as_text(v)) for k, v in sorted(changes.items())],
        # Shown rendered (sanitised) beside its escaped text in `changes`.
        "description": description
        if event.get("route") in MARKUP_ROUTES and isinstance(description, str)
        else None,
        "raw": raw if len(raw) <= _RAW_CHARS else raw[:_RAW_CHARS] + "\n...",
    }


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


_COLUMNS = (
    "time", "kind", "request_id", "subject", "method", "path", "route", "decision", "reason_id",
    "status", "latency_ms", "remote_addr", "user_agent", "policy_revision",
)  # fmt: skip
