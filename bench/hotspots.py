"""Optional: sample the gateway with py-spy during a closed-loop run and list where time goes.

py-spy is not a project dependency (`.venv/bin/pip install py-spy` to use `--profile`). Never
changes the process it samples; it only reads its stacks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

# Frames worth naming in a per-request cost list: the pipeline, its libraries, TLS. Not the
# command line and the app's catch-all handler, which sit under every request.
_INTERESTING = re.compile(
    r"gateway/(stages|policy|audit|metrics|pipeline|jwks)|regopy/|aiohttp/client|sslproto|"
    r"prometheus_client|json/"
)


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_sampling(executable: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[str]:
    """py-spy record in the background, as collapsed stacks in out."""
    command = [
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "-o",
        str(out),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stacks(stacks_file: Path) -> Iterator[tuple[list[str], int]]:
    """Each sampled stack (frames as "func (path/file.py)", outermost first) and its count."""
    for line in stacks_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # "func (path/file.py:123)" -> "func (path/file.py)": a function, not a line.
        yield [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")], int(count)


def inclusive_shares(stacks_file: Path) -> tuple[int, list[tuple[str, float]]]:
    """Busy samples, and each interesting function's share of them (counted once per stack)."""
    shares: Counter[str] = Counter()
    total = 0
    for frames, samples in _stacks(stacks_file):
        total += samples
        for name in set(frames):
            if _INTERESTING.search(name):
                shares[name] += samples
    return total, [(name, n / total) for name, n in shares.most_common(25)] if total else []


def self_shares(stacks_file: Path, top: int = 20) -> list[tuple[str, float]]:
    """Each function's share of busy samples as the innermost frame: where the CPU actually is."""
    shares: Counter[str] = Counter()
    total = 0
    for frames, samples in _stacks(stacks_file):
        total += samples
        shares[frames[-1]] += samples
    return [(name, n / total) for name, n in shares.most_common(top)] if total else []
