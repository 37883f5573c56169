"""Impact replay: re-evaluate recorded decision inputs against an edited policy directory.

The security team reviews a policy change with it before it ships: every decision in the
decision log (or those since --since) is evaluated again with the candidate policy, and the
flips are printed grouped by route and roles, with example decision ids. A flip from deny to
allow widens access: the command exits 1 on any unless told to accept them.

Inputs are replayed as recorded; fields the log erased or masked are replayed erased or
masked, so a rule that reads them may flip for that reason alone (the report counts them).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gateway.policy import PolicyError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from gateway.policy.embedded import EmbeddedPolicyEngine

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EXAMPLES = 3


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "24h" or "7d"."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not number.isdigit():
        raise ValueError(f"--since {text!r}: use a number and one of s, m, h, d (e.g. 24h)")
    return int(number) * _UNITS[unit]


@dataclass
class Flip:
    """Decisions of one route and role set that changed in one direction."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)


@dataclass
class ReplayReport:
    """What the replay found."""

    replayed: int = 0
    skipped: int = 0
    unchanged: int = 0
    errors: int = 0
    redacted_inputs: int = 0
    widened: dict[tuple[str, str], Flip] = field(default_factory=dict)  # deny -> allow
    narrowed: dict[tuple[str, str], Flip] = field(default_factory=dict)  # allow -> deny
    candidate_revision: str = ""

    @property
    def widened_count(self) -> int:
        """How many decisions would now allow what was denied."""
        return sum(f.count for f in self.widened.values())

    @property
    def narrowed_count(self) -> int:
        """How many decisions would now deny what was allowed."""
        return sum(f.count for f in self.narrowed.values())


def replay(
    events: Iterable[dict[str, Any]], engine: EmbeddedPolicyEngine, *, since: float | None = None
) -> ReplayReport:
    """Evaluate each recorded input with engine and compare with the recorded result."""
    report = ReplayReport(candidate_revision=engine.revision)
    horizon = time.time() - since if since is not None else None
    widened: defaultdict[tuple[str, str], Flip] = defaultdict(Flip)
    narrowed: defaultdict[tuple[str, str], Flip] = defaultdict(Flip)
    for event in events:
        recorded = _recorded(event, horizon)
        if recorded is None:
            report.skipped += 1
            continue
        document, was_allowed = recorded
        report.replayed += 1
        if event.get("erased") or event.get("masked"):
            report.redacted_inputs += 1
        try:
            decision = engine.evaluate(document)
        except PolicyError:
            report.errors += 1  # the candidate fails on this input: a deny, and worth a look
            decision = None
        now_allowed = decision is not None and decision.allow
        if now_allowed == was_allowed:
            report.unchanged += 1
            continue
        key = (str(event.get("route", "-")), ",".join(sorted(_roles(document))) or "(none)")
        flip = widened[key] if now_allowed else narrowed[key]
        flip.count += 1
        if len(flip.examples) < _EXAMPLES:
            flip.examples.append(str(event.get("decision_id", "?")))
        if decision is not None:
            flip.reasons.update(decision.reasons)
    report.widened, report.narrowed = dict(widened), dict(narrowed)
    return report


def _recorded(event: dict[str, Any], horizon: float | None) -> tuple[dict[str, Any], bool] | None:
    document, result = event.get("input"), event.get("result")
    if not isinstance(document, dict) or not isinstance(result, dict):
        return None
    if not isinstance(result.get("allow"), bool):
        return None
    if horizon is not None:
        try:
            stamp = datetime.fromisoformat(str(event["timestamp"])).timestamp()
        except (KeyError, ValueError):
            return None
        if stamp < horizon:
            return None
    return document, result["allow"]


def _roles(document: dict[str, Any]) -> list[str]:
    subject = document.get("subject")
    roles = subject.get("roles") if isinstance(subject, dict) else None
    return [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []


def render(report: ReplayReport, directory: Path) -> str:
    """The report as the security team reads it."""
    lines = [
        (
            f"replayed {report.replayed} decisions against {directory} "
            f"(revision {report.candidate_revision}); {report.skipped} skipped"
        ),
        (
            f"unchanged {report.unchanged}, deny->allow {report.widened_count}, "
            f"allow->deny {report.narrowed_count}, evaluation errors {report.errors}"
        ),
    ]
    if report.redacted_inputs:
        lines.append(
            f"note: {report.redacted_inputs} inputs had erased or masked fields (replayed so)"
        )
    for title, flips in (("DENY -> ALLOW", report.widened), ("ALLOW -> DENY", report.narrowed)):
        for (route, roles), flip in sorted(flips.items(), key=lambda kv: -kv[1].count):
            reasons = ", ".join(r for r, _ in flip.reasons.most_common(3))
            lines.append(
                f"{title}  route={route} roles={roles}  {flip.count}x  "
                f"e.g. {', '.join(flip.examples)}" + (f"  reasons: {reasons}" if reasons else "")
            )
    return "\n".join(lines)
