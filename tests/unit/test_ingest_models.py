"""The outlier model in the validate stage: lazy load, scores forwarded, cold start, bad files, live swap."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import TYPE_CHECKING

import pytest
from test_ingest_validation import CATALOG, GOOD, envelope, run, stage

from gateway.validation import anomaly
from gateway.validation.outliers import ModelSlots
from gateway.validation.streams import StreamCatalog

if TYPE_CHECKING:
    from pathlib import Path

MODEL_ONLY = StreamCatalog(streams={
    "readings": dataclasses.replace(CATALOG.streams["readings"], statistics=None),
})  # fmt: skip
FEATURES = ("temperature", "humidity", "power_w")


def history(n: int = 800, seed: int = 1) -> list[list[float]]:
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not a secret
    rows = []
    for _ in range(n):
        temperature = rng.gauss(21, 2)
        rows.append([temperature, rng.gauss(45, 8), 50 + 12 * temperature + rng.gauss(0, 5)])
    return rows


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    key_file = tmp_path / "model.key"
    directory = tmp_path / "models"
    model = anomaly.train(history(), stream="readings", features=FEATURES)
    anomaly.save(model, directory, anomaly.ensure_key(key_file))
    return directory, key_file


async def test_scores_travel_with_each_record_and_a_spike_is_quarantined(models):
    """Every stored record carries its score and the model id; a far outlier is quarantined."""
    directory, key_file = models
    slots = ModelSlots(directory, key_file)
    spike = {**GOOD, "temperature": 70.0, "power_w": 900.0}
    ctx = await run(stage(MODEL_ONLY, models=slots), "readings", [GOOD, spike])
    sent = envelope(ctx)
    first, second = sent["records"]
    assert first["status"] == "accepted"
    assert first["model"] == second["model"] == "readings@v0001"
    assert isinstance(first["score"], float)
    assert second["score"] > first["score"]
    assert (second["status"], second["flags"][0]["rule"]) == ("quarantined", "model.hbos")
    assert ctx.detail["validation"]["model"] == "readings@v0001"


async def test_no_model_yet_is_a_cold_start_that_accepts(tmp_path):
    """With nothing trained, on_cold_start (accept) applies and no score is sent."""
    slots = ModelSlots(tmp_path / "models", tmp_path / "model.key")
    ctx = await run(stage(MODEL_ONLY, models=slots), "readings", [GOOD])
    record = envelope(ctx)["records"][0]
    assert record["status"] == "accepted"
    assert "score" not in record


async def test_a_tampered_model_file_quarantines_and_is_never_loaded(models):
    """A model file whose signature fails is refused: records are quarantined, not passed."""
    directory, key_file = models
    path = anomaly.latest(directory, "readings")
    assert path is not None
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0x01
    path.write_bytes(bytes(blob))
    reports: list[tuple[str, dict]] = []
    slots = ModelSlots(directory, key_file, report=lambda k, d: reports.append((k, d)))
    ctx = await run(stage(MODEL_ONLY, models=slots), "readings", [GOOD])
    record = envelope(ctx)["records"][0]
    assert (record["status"], record["flags"][0]["rule"]) == ("quarantined", "model.unavailable")
    assert [kind for kind, _ in reports] == ["anomaly.model_rejected"]


async def test_a_model_with_other_features_than_the_config_is_an_error(tmp_path):
    """Config and model must agree on the features; otherwise records are quarantined."""
    key_file, directory = tmp_path / "model.key", tmp_path / "models"
    model = anomaly.train([row[:2] for row in history()], stream="readings", features=FEATURES[:2])
    anomaly.save(model, directory, anomaly.ensure_key(key_file))
    slots = ModelSlots(directory, key_file)
    ctx = await run(stage(MODEL_ONLY, models=slots), "readings", [GOOD])
    flag = envelope(ctx)["records"][0]["flags"][0]
    assert flag["rule"] == "model.unavailable"
    assert "retrain" in flag["message"]


async def test_a_newer_model_is_picked_up_without_restart(models):
    """After `anomaly train` saves v0002, the stage uses it within check_seconds."""
    directory, key_file = models
    slots = ModelSlots(directory, key_file, check_seconds=0.0)
    validate = stage(MODEL_ONLY, models=slots)
    assert (
        envelope(await run(validate, "readings", [GOOD]))["records"][0]["model"] == "readings@v0001"
    )
    newer = anomaly.train(history(seed=2), stream="readings", features=FEATURES)
    anomaly.save(newer, directory, anomaly.ensure_key(key_file))
    seen = set()
    for _ in range(50):
        seen.add(envelope(await run(validate, "readings", [GOOD]))["records"][0]["model"])
        if "readings@v0002" in seen:
            break
        await asyncio.sleep(0.05)
    assert "readings@v0002" in seen


async def test_a_record_missing_a_feature_cannot_be_scored(models):
    """A record whose feature is not a number is flagged model.unscorable (on_error)."""
    directory, key_file = models
    catalog = StreamCatalog(streams={
        "readings": dataclasses.replace(MODEL_ONLY.streams["readings"], record_schema=None),
    })  # fmt: skip
    slots = ModelSlots(directory, key_file)
    ctx = await run(
        stage(catalog, models=slots), "readings", [{"sensor": "ab-1", "at": "2026-11-23T10:00:00Z"}]
    )
    record = json.loads(ctx.body)["records"][0]
    assert (record["status"], record["flags"][0]["rule"]) == ("quarantined", "model.unscorable")


async def test_a_huge_integer_feature_is_unscorable_not_a_crash(models):
    """An integer too big for a float (400 digits) cannot be scored: flagged, not a 500."""
    directory, key_file = models
    catalog = StreamCatalog(streams={
        "readings": dataclasses.replace(MODEL_ONLY.streams["readings"], record_schema=None),
    })  # fmt: skip
    slots = ModelSlots(directory, key_file)
    huge = {**GOOD, "temperature": 10**400}
    ctx = await run(stage(catalog, models=slots), "readings", [huge])
    record = json.loads(ctx.body)["records"][0]
    assert (record["status"], record["flags"][0]["rule"]) == ("quarantined", "model.unscorable")
