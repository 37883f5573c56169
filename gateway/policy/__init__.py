"""Policy decision engines behind one interface: the embedded regopy engine (remote OPA later).

An engine answers a checked Decision or raises PolicyError; it never answers "allow" on doubt.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.pipeline import Decision


class PolicyError(Exception):
    """The engine could not produce a well-formed decision: the caller must deny."""


class PolicyEngine(Protocol):
    """Evaluates the decision for one input document."""

    revision: str

    def decide(self, document: dict[str, Any]) -> Decision:
        """The checked decision, or raise PolicyError."""


def check_decision(result: Any, revision: str, eval_us: float) -> Decision:
    """Accept only `{"allow": bool, "reasons": [str], "dry_run"?: bool}`; else an engine error."""
    if not isinstance(result, dict):
        raise PolicyError(f"decision is {type(result).__name__}, not an object")
    allow = result.get("allow")
    reasons = result.get("reasons", [])
    if not isinstance(allow, bool):
        raise PolicyError("decision.allow is not a boolean")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise PolicyError("decision.reasons is not a list of strings")
    dry_run = result.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise PolicyError("decision.dry_run is not a boolean")
    return Decision(
        allow=allow,
        reasons=tuple(sorted(reasons)),
        revision=revision,
        eval_us=eval_us,
        dry_run=dry_run,
    )
