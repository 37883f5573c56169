"""The outlier models in use: loaded lazily per stream, swapped for a newer version live.

pyod costs ~2 s to import, so nothing here imports it: the first record of a stream with a
model loads that model in a thread (the event loop keeps serving), and requests after that
use it. Every `check_seconds` a use also looks (in the background) for a newer version in the
model directory and swaps it in; a newer file that fails verification is refused and the
loaded model stays. A model that cannot be loaded at all is an error for the stream's
`on_error` action, never a pass.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gateway.validation import anomaly

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = structlog.get_logger("gateway.validation.outliers")


class ModelUnavailableError(Exception):
    """The stream's model exists but cannot be used (bad file, wrong features, no key)."""


@dataclass(slots=True)
class _Slot:
    model: anomaly.TrainedModel | None = None
    path: Path | None = None
    checked_at: float = 0.0
    error: str = ""
    rejected: Path | None = None  # a file that failed verification: not retried, not re-reported
    task: asyncio.Task[None] | None = None


class ModelSlots:
    """Per stream: the newest verified model file in `directory/<stream>/`, once loaded."""

    def __init__(
        self,
        directory: Path,
        key: Path | Callable[[], bytes],
        *,
        check_seconds: float = 5.0,
        report: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        # The key is read at each load (in the thread), so a rotated key serves the next model.
        self._read_key = key if callable(key) else functools.partial(anomaly.load_key, key)
        self._check_seconds = check_seconds
        self._report = report or (lambda _kind, _detail: None)
        self._clock = clock
        self._slots: dict[str, _Slot] = {}

    async def current(self, stream: str, features: tuple[str, ...]) -> anomaly.TrainedModel | None:
        """The stream's model; None when none was trained yet; raises ModelUnavailableError."""
        slot = self._slots.setdefault(stream, _Slot())
        stale = self._clock() - slot.checked_at > self._check_seconds
        if slot.model is None and (stale or not slot.checked_at):
            # No model in use: wait for the look (and a threaded load), so that a model trained
            # since the last look is used from this request on, not only from a later one.
            if slot.task is None:
                slot.task = asyncio.create_task(self._refresh(stream, slot), name=f"model-{stream}")
            await asyncio.shield(slot.task)
        elif stale and slot.task is None:
            slot.task = asyncio.create_task(self._refresh(stream, slot), name=f"model-{stream}")
        if slot.model is None:
            if slot.error:
                raise ModelUnavailableError(slot.error)
            return None
        if slot.model.meta.features != features:
            raise ModelUnavailableError(
                f"model {slot.model.meta.model_id} was trained on {list(slot.model.meta.features)}"
                f", the stream config lists {list(features)}; retrain it"
            )
        return slot.model

    def status(self) -> dict[str, Any]:
        """Per stream seen so far: the loaded model's id and any load error."""
        return {
            name: {
                "model": slot.model.meta.model_id if slot.model else None,
                "error": slot.error or None,
            }
            for name, slot in self._slots.items()
        }

    async def _refresh(self, stream: str, slot: _Slot) -> None:
        path: Path | None = None
        try:
            path = await asyncio.to_thread(anomaly.latest, self._directory, stream)
            if path is not None and path not in {slot.path, slot.rejected}:
                model = await asyncio.to_thread(self._load, path)
                previous = slot.model.meta.model_id if slot.model else None
                slot.model, slot.path, slot.error = model, path, ""
                log.info("validation.model_loaded", stream=stream, model=model.meta.model_id)
                self._report(
                    "anomaly.model_loaded",
                    {"stream": stream, "model": model.meta.model_id, "previous": previous},
                )
            elif path is None and slot.model is None:
                slot.error = ""  # nothing trained yet: a cold start, not an error
        except (anomaly.ModelError, OSError) as exc:
            slot.error, slot.rejected = f"{type(exc).__name__}: {exc}"[:300], path
            log.error("validation.model_rejected", stream=stream, error=slot.error)  # noqa: TRY400
            self._report("anomaly.model_rejected", {"stream": stream, "error": slot.error})
        finally:
            slot.checked_at = self._clock()
            slot.task = None

    def _load(self, path: Path) -> anomaly.TrainedModel:
        return anomaly.load(path, self._read_key())
