"""Hot reload of policies/: on a file change (watchfiles) or SIGHUP, test, then swap.

A new revision is snapshotted, then compiled and its tests run in a child process (`gateway
policy test` on the snapshot): rego-cpp can crash its process on some broken policies, and a
broken edit must not take the gateway with it. Only a snapshot that passed is compiled here
and replaces the engine; anything else keeps the last good revision, is logged, counted and
shown in /readyz. Every accepted reload is audited with its revision hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.policy import PolicyError
from gateway.policy.embedded import EmbeddedPolicyEngine, PolicySources

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger("gateway.policy.reload")
_OUTPUT_LIMIT = 2000


@dataclass
class ReloadStatus:
    """What /readyz shows about reloads."""

    revision: str
    last_attempt: float = 0.0
    last_error: str | None = None  # the last rejected edit's reason, None once a reload succeeds
    rejected_revision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """For the readiness document."""
        return {
            "revision": self.revision,
            "last_attempt": self.last_attempt,
            "last_error": self.last_error,
            "rejected_revision": self.rejected_revision,
        }


class PolicyReloader:
    """Serialises reloads; the swap happens on the event loop, between two requests."""

    def __init__(
        self,
        *,
        directory: Path,
        entrypoint: str,
        memo_size: int,
        revision: str,
        config_file: Path | None,
        swap: Callable[[EmbeddedPolicyEngine], None],
        report: Callable[[str, dict[str, Any]], None],
        timeout_seconds: float = 120.0,
    ) -> None:
        self._directory = directory
        self._entrypoint = entrypoint
        self._memo_size = memo_size
        self._config_file = config_file
        self._swap = swap
        self._report = report  # (kind, detail): audit and metrics
        self._timeout = timeout_seconds
        self._lock = asyncio.Lock()
        self.status = ReloadStatus(revision=revision)

    async def reload(self, trigger: str) -> bool:
        """Test and swap in the directory's current revision; True when it was swapped in."""
        async with self._lock:
            self.status.last_attempt = time.time()
            try:
                sources = PolicySources.read(self._directory)
            except PolicyError as exc:
                return self._reject(trigger, None, str(exc))
            if sources.revision == self.status.revision:
                return False  # an editor touched a file without changing it
            with tempfile.TemporaryDirectory(prefix="policy-") as tmp:
                snapshot = Path(tmp) / "policies"
                shutil.copytree(self._directory, snapshot)
                tested = PolicySources.read(snapshot)
                failure = await self._test_in_child(snapshot)
                if failure is not None:
                    return self._reject(trigger, tested.revision, failure)
                try:
                    engine = EmbeddedPolicyEngine(
                        tested, self._entrypoint, memo_size=self._memo_size
                    )
                except PolicyError as exc:
                    return self._reject(trigger, tested.revision, str(exc))
            previous = self.status.revision
            self._swap(engine)
            self.status.revision, self.status.last_error = engine.revision, None
            self.status.rejected_revision = None
            log.info(
                "policy.reloaded", revision=engine.revision, previous=previous, trigger=trigger
            )
            self._report(
                "policy.reloaded",
                {"revision": engine.revision, "previous": previous, "trigger": trigger},
            )
            return True

    async def _test_in_child(self, snapshot: Path) -> str | None:
        command = [sys.executable, "-m", "gateway"]
        if self._config_file is not None:
            command += ["--config", str(self._config_file)]
        command += ["policy", "test", "--dir", str(snapshot)]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            return f"policy tests took longer than {self._timeout:.0f} s"
        if process.returncode == 0:
            return None
        text = output.decode("utf-8", "replace")
        failed = [line for line in text.splitlines() if line.startswith(("FAIL", "gateway:"))]
        summary = "; ".join(failed[:5]) or text[-_OUTPUT_LIMIT:]
        return f"policy test exited {process.returncode}: {summary}"[:_OUTPUT_LIMIT]

    def _reject(self, trigger: str, revision: str | None, error: str) -> bool:
        self.status.last_error = error
        self.status.rejected_revision = revision
        log.error("policy.reload_rejected", revision=revision, trigger=trigger, error=error)
        self._report(
            "policy.reload_rejected",
            {"revision": revision, "kept": self.status.revision, "trigger": trigger,
             "error": error},
        )  # fmt: skip
        return False

    async def watch(self) -> None:
        """Reload whenever a file under the directory changes (debounced by watchfiles)."""
        from watchfiles import awatch  # noqa: PLC0415 - only the serving gateway watches

        async for _changes in awatch(self._directory, debounce=500, recursive=True):
            with contextlib.suppress(Exception):  # logged in reload; the watch goes on
                await self.reload("watch")
