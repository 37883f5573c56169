"""The decision log: one event per policy decision, in the shape of OPA's decision-log events.

    {"decision_id", "path", "input", "result", "bundles": {"gateway": {"revision"}},
     "timestamp", "metrics": {"timer_rego_query_eval_ns"}, "erased": [...], "masked": [...],
     "labels": {"app": "emp-gateway"}, "dry_run", "route"}

Fields of the input named by JSON pointers in config are erased (removed, listed in "erased")
or masked (replaced by "**REDACTED**", listed in "masked"), as OPA's mask policy does. The
gateway's input never holds a credential, and ALWAYS_ERASED removes the places one could be
should the input ever grow: nothing a token or cookie carries reaches this file. `gateway
policy replay` reads these events back.

Retention (gateway/archive/) rotates the file: it becomes a closed segment `<path>.<UTC time>`
and the writer goes on in a new file; a writer in another process reopens within a second.
The file is never rewritten under a writer.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gateway.masking import MaskSecrets

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.pipeline import Decision

MASK = "**REDACTED**"
_REOPEN_CHECK_SECONDS = 1.0  # how soon a writer notices its file was rotated by another process
# Erased whatever the config says: where a credential would be if it ever entered the input.
ALWAYS_ERASED = (
    "/input/request/headers/authorization",
    "/input/request/headers/cookie",
    "/input/request/headers/proxy-authorization",
    "/input/subject/claims/token",
)


def _parts(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON pointer (it must start with '/')")
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _apply(event: dict[str, Any], pointer: str, *, erase: bool) -> bool:
    """Erase or mask the field at pointer, copying each object on the way (copy on write).

    The input document's inner objects belong to the request and must not change.
    """
    parts = _parts(pointer)
    if not _present(event, parts):
        return False
    target = event
    for part in parts[:-1]:
        target[part] = dict(target[part])
        target = target[part]
    if erase:
        del target[parts[-1]]
    else:
        target[parts[-1]] = MASK
    return True


def _present(event: dict[str, Any], parts: list[str]) -> bool:
    target: Any = event
    for part in parts:
        if not isinstance(target, dict) or part not in target:
            return False
        target = target[part]
    return True


class DecisionLog:
    """Appends decision events as JSON lines (written at once, like the audit's lines)."""

    def __init__(
        self,
        path: Path | str,
        *,
        erase: Sequence[str] = (),
        mask: Sequence[str] = (),
        entrypoint: str = "gateway/authz/decision",
        secrets: MaskSecrets | None = None,
    ) -> None:
        for pointer in (*erase, *mask):
            _parts(pointer)  # a malformed pointer stops the start, not the first request
        self._erase = tuple(dict.fromkeys((*ALWAYS_ERASED, *erase)))
        self._mask = tuple(mask)
        self._secrets = secrets or MaskSecrets()
        self._path = entrypoint
        self._file = Path(path)
        self._lock = threading.Lock()  # a line and a rotation never interleave
        self._stream: IO[str] = _open_append(self._file)
        self._next_check = time.monotonic() + _REOPEN_CHECK_SECONDS

    def event(
        self,
        *,
        decision_id: str,
        document: dict[str, Any],
        decision: Decision,
        wall_time: float,
        route: str,
        dry_run: bool,
    ) -> dict[str, Any]:
        """The decision-log event of one decision, with the configured fields erased/masked."""
        event: dict[str, Any] = {
            "decision_id": decision_id,
            "path": self._path,
            "input": document,  # copied on write by _apply where a field is erased or masked
            "result": {"allow": decision.allow, "reasons": list(decision.reasons)},
            "bundles": {"gateway": {"revision": decision.revision}},
            "timestamp": datetime.fromtimestamp(wall_time, UTC).isoformat(timespec="microseconds"),
            "metrics": {"timer_rego_query_eval_ns": int(decision.eval_us * 1000)},
            "labels": {"app": "emp-gateway"},
            "route": route,
            "dry_run": dry_run,
            "memoised": decision.memoised,
        }
        erased = [p for p in self._erase if _apply(event, p, erase=True)]
        masked = [p for p in self._mask if _apply(event, p, erase=False)]
        if self._mask_query(event):
            masked.append("/input/request/query")
        if erased:
            event["erased"] = erased
        if masked:
            event["masked"] = masked
        return event

    def _mask_query(self, event: dict[str, Any]) -> bool:
        """A credential in the query string (?access_token=...) never reaches the log."""
        request = event["input"].get("request")
        query = request.get("query") if isinstance(request, dict) else None
        if not query:
            return False
        secrets = self._secrets
        cleaned = {
            name: [MASK] * len(values) if secrets.is_sensitive_key(name)
            else [secrets.mask_text(v) if isinstance(v, str) else v for v in values]
            for name, values in query.items()
        }  # fmt: skip
        if cleaned == query:
            return False
        event["input"] = {**event["input"], "request": {**request, "query": cleaned}}
        return True

    def record(self, **fields: Any) -> None:
        """Build and append one event."""
        line = json.dumps(self.event(**fields), separators=(",", ":"), default=str)
        with self._lock:
            self._reopen_if_rotated()
            self._stream.write(line + "\n")
            self._stream.flush()

    def rotate(self) -> Path | None:
        """Close the file as a segment and go on in a new one; the segment (None if empty)."""
        with self._lock:
            segment = rotate_file(self._file)
            if self._stream.closed:  # the gateway is stopping: nothing to reopen
                return segment
            self._stream.close()
            self._stream = _open_append(self._file)
            return segment

    def _reopen_if_rotated(self) -> None:
        """Another process (worker 0, the CLI) renamed the file: write to the new one."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + _REOPEN_CHECK_SECONDS
        try:
            moved = self._file.stat().st_ino != os.fstat(self._stream.fileno()).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            self._stream.close()
            self._stream = _open_append(self._file)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._stream.close()


def rotate_file(path: Path) -> Path | None:
    """Rename a non-empty log to `<path>.<UTC time>` (a closed segment); None when empty."""
    try:
        if path.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    while True:
        segment = path.with_name(f"{path.name}.{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
        if not segment.exists():  # one rotator at a time: the archival job holds its lock
            break
    path.rename(segment)
    return segment


def segments(path: Path) -> list[Path]:
    """The closed segments of a log, oldest first."""
    shape = re.compile(re.escape(path.name) + r"\.\d{8}T\d{12}Z")
    found = [p for p in path.parent.glob(f"{path.name}.*") if shape.fullmatch(p.name)]
    return sorted(found)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every event of a log: its closed segments, oldest first, then the current file."""
    events: list[dict[str, Any]] = []
    for segment in segments(path):
        events.extend(read_events(segment))
    if path.exists():
        events.extend(read_events(path))
    return events


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of a decision-log file (a torn last line is skipped)."""
    events = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _open_append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", buffering=1)
