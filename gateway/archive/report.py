"""What an archival run did, per table: the shape of its audit event and of its CLI output.

The EMP service answers its part in the same shape (`TableResult.from_dict`). Holds counts, file
names and check results only: never a row.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["archived", "nothing", "failed"]


@dataclass
class TableResult:
    """One table's part of a run."""

    table: str
    status: Status = "nothing"
    rows: int = 0  # archived, verified and deleted
    files: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    discarded: list[str] = field(default_factory=list)  # leftovers of interrupted runs, removed
    problems: list[str] = field(default_factory=list)  # committed archives found not whole

    def fail(self, error: str) -> None:
        """Mark the table failed: none of its rows was deleted in this run."""
        self.status, self.error = "failed", error

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape."""
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> TableResult:
        """Read the EMP service's answer for one of its tables (unknown keys ignored)."""
        status = document.get("status")
        result = cls(
            table=str(document.get("table")),
            status=status if status in {"archived", "nothing", "failed"} else "failed",
            rows=int(document.get("rows") or 0),
        )
        result.files = [str(name) for name in document.get("files") or []]
        result.verification = dict(document.get("verification") or {})
        result.error = document.get("error")
        result.discarded = [str(name) for name in document.get("discarded") or []]
        result.problems = [str(text) for text in document.get("problems") or []]
        return result


@dataclass
class RunReport:
    """One run: its id (in every archive file name of the run), trigger and tables."""

    trigger: str  # "schedule", "cli", "admin"
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: str = field(default_factory=lambda: _now())  # noqa: PLW0108 - _now is defined below
    finished_at: str = ""
    tables: list[TableResult] = field(default_factory=list)

    @property
    def outcome(self) -> Literal["completed", "failed"]:
        """Failed when any table failed (the others may still have been archived)."""
        failed = any(t.status == "failed" or t.problems for t in self.tables)
        return "failed" if failed else "completed"

    def finish(self) -> None:
        """Stamp the end of the run."""
        self.finished_at = _now()

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape: the audit event's detail and the CLI's output."""
        return {
            "run_id": self.run_id,
            "trigger": self.trigger,
            "outcome": self.outcome,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "tables": [table.as_dict() for table in self.tables],
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
