"""Rego line coverage for `gateway policy test`: which policy lines the tests and the matrix ran.

regopy has no coverage API, but Rego's print() works and writes to the process's stdout from C.
So a copy of each policy module (never the tests) gets `print("__cov__ <line> <module>")` markers,
the tests and the matrix run against the copy in a child process, and the child's stdout says
which lines ran. The instrumented copy is only ever evaluated there, never served.

What counts, per module:
- a rule head whose body is a `{ ... }` block: covered when evaluation enters the body;
- each expression at the top level of such a body: covered when it held (evaluation got past
  it), so a condition no test ever satisfied shows; an expression spanning lines (brackets,
  `with` continuations, nested `every` or comprehension blocks) counts once, on its first line;
- a one-line rule `head if expression`: covered when the expression held.
Constants, defaults, imports, comments, and expressions that share a line with a body's
closing brace are not counted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.policy import PolicyError

if TYPE_CHECKING:
    from gateway.policy.embedded import PolicySources

_MARK = "__cov__"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WITH = re.compile(r"\s*with\b")
_CHILD_TIMEOUT_S = 120.0
_BODY, _VALUE = "body", "value"


@dataclass
class _Line:
    """What the scanner learnt about one source line."""

    text: str
    code: bool = False  # anything but blanks and comments
    end_stack: tuple[str, ...] = ()
    opens_body: bool = False  # a rule body's `{` is opened here and still open at the end
    bare_if: int | None = None  # column after a one-line rule's `if`


@dataclass
class _Scanner:
    """Tracks strings, comments and brackets through a module, one line at a time."""

    stack: list[str] = field(default_factory=list)
    in_raw_string: bool = False

    def scan(self, text: str) -> _Line:
        """Scan one line, carrying open brackets and raw strings over to the next."""
        line = _Line(text)
        body_next = False  # the last token was `if` or `else` before a `{`
        i = 0
        while i < len(text):
            if self.in_raw_string:
                end = text.find("`", i)
                self.in_raw_string = end < 0
                i = len(text) if end < 0 else end + 1
            elif text[i] == "#":
                break
            elif text[i].isspace():
                i += 1
            else:
                line.code = True
                i, body_next = self._token(text, i, line, body_next=body_next)
        line.end_stack = tuple(self.stack)
        line.opens_body = line.opens_body and line.end_stack == (_BODY,)
        return line

    def _token(self, text: str, i: int, line: _Line, *, body_next: bool) -> tuple[int, bool]:
        """Consume the token at i; the index after it, and whether a body's `{` comes next."""
        char = text[i]
        if char == '"':
            return _string_end(text, i), False
        if char == "`":
            self.in_raw_string = True
        elif char in "{[(":
            kind = _BODY if char == "{" and body_next else _VALUE
            self.stack.append(kind)
            line.opens_body = line.opens_body or kind == _BODY
        elif char in "}])":
            if self.stack:
                self.stack.pop()
        elif word := _WORD.match(text, i):
            return word.end(), self._after_keyword(word.group(), text, word.end(), line)
        return i + 1, False

    def _after_keyword(self, word: str, text: str, end: int, line: _Line) -> bool:
        """Whether the next `{` opens a rule body; notes a one-line rule's expression."""
        if self.stack or word not in ("if", "else"):
            return False
        rest = text[end:].lstrip()
        if rest.startswith("{"):
            return True
        if word == "if" and rest and not rest.startswith("#"):
            line.bare_if = end
        return False


def _string_end(text: str, start: int) -> int:
    """The index after the double-quoted string that starts at start."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return i


@dataclass(frozen=True)
class InstrumentedModule:
    """A module's text with coverage markers, and the source lines they report."""

    text: str
    lines: frozenset[int]


def instrument(module: str, text: str) -> InstrumentedModule:
    """Insert a print marker after each rule head and each top-level body expression."""
    scanner = _Scanner()
    scanned = [scanner.scan(line) for line in text.split("\n")]
    out: list[str] = []
    lines: set[int] = set()
    started: int | None = None  # the line the body expression being read began on
    rule: int | None = None  # the line a one-line rule began on; its expression is wrapped
    for number, line in enumerate(scanned, start=1):
        continues = _continues(scanned, number)
        if rule is None and started is None and line.bare_if is not None:
            rule = number
            out.append(line.text[: line.bare_if].rstrip() + " {")
            out.append(f"{_indent(line.text)}\t{line.text[line.bare_if :].strip()}")
        else:
            out.append(line.text)
        if rule is not None:
            if not line.end_stack and not continues:
                indent = _indent(scanned[rule - 1].text)
                out.extend((f"{indent}\t{_marker(module, rule)}", f"{indent}}}"))
                lines.add(rule)
                rule = None
        elif line.opens_body:
            out.append(f"{_indent(line.text)}\t{_marker(module, number)}")
            lines.add(number)
            started = None
        elif line.end_stack[:1] != (_BODY,):
            started = None  # outside any rule body, or the body closed on this line
        elif line.code:
            started = started or number
            if line.end_stack == (_BODY,) and not continues:
                out.append(f"{_indent(scanned[started - 1].text)}{_marker(module, started)}")
                lines.add(started)
                started = None
    return InstrumentedModule("\n".join(out), frozenset(lines))


def _continues(scanned: list[_Line], number: int) -> bool:
    """Whether the next line of code after line number continues it with a `with` modifier."""
    for line in scanned[number:]:
        if line.code:
            return _WITH.match(line.text) is not None
    return False


def _indent(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


def _marker(module: str, line: int) -> str:
    # json.dumps escapes the module path as a Rego string literal wants it.
    return f"print({json.dumps(f'{_MARK} {line} {module}')})"


@dataclass(frozen=True)
class ModuleCoverage:
    """The coverable lines of one policy module and those the checks ran."""

    module: str
    lines: tuple[int, ...]
    covered: tuple[int, ...]

    @property
    def uncovered(self) -> tuple[int, ...]:
        """Coverable lines no test or matrix cell ran."""
        return tuple(n for n in self.lines if n not in self.covered)

    @property
    def percent(self) -> float:
        """Covered lines as a percentage (100 for a module with nothing to cover)."""
        return 100.0 * len(self.covered) / len(self.lines) if self.lines else 100.0


@dataclass(frozen=True)
class CoverageReport:
    """Line coverage of every policy module."""

    modules: tuple[ModuleCoverage, ...]

    @property
    def percent(self) -> float:
        """Covered lines over all modules, as a percentage."""
        total = sum(len(m.lines) for m in self.modules)
        covered = sum(len(m.covered) for m in self.modules)
        return 100.0 * covered / total if total else 100.0

    def summary(self) -> list[str]:
        """One line per module, naming the lines not covered."""
        out = []
        for module in self.modules:
            text = f"coverage {module.module}: {len(module.covered)}/{len(module.lines)} lines"
            text += f" ({module.percent:.1f}%)"
            if module.uncovered:
                text += "; not covered: " + ", ".join(map(str, module.uncovered))
            out.append(text)
        return out


def measure_coverage(
    sources: PolicySources, documents: list[dict[str, Any]], entrypoint: str
) -> CoverageReport:
    """Run the tests and evaluate the documents against an instrumented copy; count lines."""
    instrumented = {name: instrument(name, text) for name, text in sources.modules.items()}
    with tempfile.TemporaryDirectory(prefix="policy-coverage-") as tmp:
        root = Path(tmp) / "policies"
        for name, module in instrumented.items():
            _write(root / name, module.text)
        for name, text in sources.tests.items():
            _write(root / name, text)
        for name, document in sources.data:
            _write(root / name, json.dumps(document))
        cells = Path(tmp) / "cells.json"
        cells.write_text(json.dumps(documents), encoding="utf-8")
        stdout = _run_child(root, cells, entrypoint)
    hits: dict[str, set[int]] = {name: set() for name in instrumented}
    for text in stdout.splitlines():
        mark, _, rest = text.partition(" ")
        line, _, name = rest.partition(" ")
        if mark == _MARK and name in hits and line.isdigit():
            hits[name].add(int(line))
    return CoverageReport(
        tuple(
            ModuleCoverage(
                name,
                tuple(sorted(module.lines)),
                tuple(sorted(hits[name] & module.lines)),
            )
            for name, module in sorted(instrumented.items())
        )
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _run_child(directory: Path, cells: Path, entrypoint: str) -> str:
    # A child, so that the C-level prints are its stdout and nothing else's, and so that an
    # instrumented policy regopy cannot handle crashes the child, not `gateway policy test`.
    command = [sys.executable, "-m", "gateway.policy.coverage", str(directory), str(cells)]
    try:
        process = subprocess.run(  # noqa: S603 - this interpreter, this module, our temp paths
            [*command, entrypoint],
            capture_output=True,
            text=True,
            timeout=_CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise PolicyError(f"coverage run took longer than {_CHILD_TIMEOUT_S:.0f} s") from None
    if process.returncode != 0:
        tail = " ".join(process.stderr.split())[-300:]
        raise PolicyError(f"coverage run failed (exit status {process.returncode}): {tail}")
    return process.stdout


def _child(directory: Path, cells: Path, entrypoint: str) -> int:
    """Evaluate everything once against the instrumented copy; the prints are the output."""
    from gateway.policy.embedded import EmbeddedPolicyEngine  # noqa: PLC0415 - child only
    from gateway.policy.testing import run_policy_tests  # noqa: PLC0415 - child only

    run_policy_tests(directory)
    engine = EmbeddedPolicyEngine.from_directory(directory, entrypoint)
    for document in json.loads(cells.read_text(encoding="utf-8")):
        try:
            engine.evaluate(document)
        except PolicyError:
            continue  # the matrix check reports it; here only the lines that ran matter
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
