"""Runs the `test_*` rules of a policy directory with the embedded engine.

A test passes only when its rule evaluates to true; undefined, false or an error fails it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import regopy

from gateway.policy import PolicyError
from gateway.policy.embedded import PolicySources, new_interpreter, read_output

if TYPE_CHECKING:
    from pathlib import Path

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\b", re.MULTILINE)


@dataclass(frozen=True)
class PolicyTestResult:
    """One Rego test and how it went."""

    module: str
    name: str
    passed: bool
    error: str = ""


def run_policy_tests(directory: Path) -> list[PolicyTestResult]:
    """Evaluate every test rule beside the policy; an empty list means no tests were found."""
    sources = PolicySources.read(directory)
    interpreter = new_interpreter(sources, with_tests=True)
    results: list[PolicyTestResult] = []
    for module, text in sorted(sources.tests.items()):
        package = _PACKAGE.search(text)
        if package is None:
            results.append(PolicyTestResult(module, "-", passed=False, error="no package line"))
            continue
        prefix = f"data.{package.group(1)}"
        results.extend(
            _run_one(interpreter, module, f"{prefix}.{name}", name)
            for name in dict.fromkeys(_TEST_RULE.findall(text))
        )
    return results


def _run_one(
    interpreter: regopy.Interpreter, module: str, query: str, name: str
) -> PolicyTestResult:
    try:
        value = read_output(interpreter.query(query))
    except (PolicyError, regopy.RegoError) as exc:
        return PolicyTestResult(module, name, passed=False, error=str(exc)[:300])
    return PolicyTestResult(module, name, passed=value is True)
