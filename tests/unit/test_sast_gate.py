"""The SAST gate is real: the project's own `make sast` passes on the tree and fails on a copy
with an injected critical issue (a shell command built from request data)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from support.stack import REPO

INJECTED = '''
"""A debugging endpoint someone should never have written."""

import subprocess

from aiohttp import web


async def run_diagnostic(request: web.Request) -> web.Response:
    output = subprocess.check_output(request.query["cmd"], shell=True)
    return web.Response(body=output)
'''


@pytest.fixture
def tree_copy(tmp_path):
    for name in ("gateway", "upstream"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "Makefile"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def sast(tree) -> subprocess.CompletedProcess[str]:
    """Run the gate on the copy; it must not (re)install anything into the shared venv."""
    stamps = sorted((REPO / ".venv").glob(".installed-*"))
    result = subprocess.run(
        ["make", "-s", "-C", str(tree), "sast", f"VENV={REPO / '.venv'}", "SAST_DEPS="],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sorted((REPO / ".venv").glob(".installed-*")) == stamps
    return result


def test_sast_passes_on_the_clean_tree(tree_copy):
    """The tree as committed has no high-severity finding."""
    result = sast(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sast_fails_on_injected_shell_injection(tree_copy):
    """subprocess with shell=True on request data fails the gate and is named in the report."""
    (tree_copy / "gateway" / "stages" / "diagnostic.py").write_text(INJECTED)
    result = sast(tree_copy)
    assert result.returncode != 0
    assert "B602" in result.stdout + result.stderr
    assert "diagnostic.py" in result.stdout + result.stderr
