"""Searching a deployment's files byte by byte, as someone holding a copy of its disk would."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def disk_hits(root: Path, needles: dict[str, str]) -> dict[str, list[str]]:
    """Which needles occur as bytes (UTF-8, and UTF-16 as some tools write) in which files."""
    hits: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for label, needle in needles.items():
            if needle.encode() in data or needle.encode("utf-16-le") in data:
                hits.setdefault(label, []).append(str(path.relative_to(root)))
    return hits
