"""Outlier models: training, scoring, and versioned model files that refuse any tampering."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gateway.validation import anomaly
from gateway.validation.anomaly import ModelError, TrainedModel

REPO = Path(__file__).resolve().parents[2]
FEATURES = ("temperature", "humidity", "latency_ms")
MEANS = np.array([21.0, 45.0, 20.0])
SIGMAS = np.array([2.0, 8.0, 5.0])
KEY = bytes(range(32))


def normal_rows(count: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    rows: list[list[float]] = (rng.normal(MEANS, SIGMAS, size=(count, 3))).tolist()
    return rows


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    """The default (HBOS) model on 2,000 normal rows; its first fit compiles numba (~5 s)."""
    return anomaly.train(normal_rows(2000, seed=1), stream="sensors", features=FEATURES)


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


def planted(models_dir: Path, marker: Path, *, version: int = 1, **meta_changes) -> Path:
    """A correctly signed model file whose unpickling would create marker (it must not)."""

    class _Plant:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    meta = anomaly.ModelMeta(
        stream="sensors",
        version=version,
        algorithm="hbos",
        features=FEATURES,
        contamination=0.01,
        threshold=1.0,
        trained_at="2026-11-22T10:00:00Z",
        samples=2000,
        pyod_version=anomaly.metadata.version("pyod"),
        sklearn_version=anomaly.metadata.version("scikit-learn"),
        numpy_version=anomaly.metadata.version("numpy"),
    )
    meta = replace(meta, **meta_changes)
    path = models_dir / "sensors" / anomaly.model_file_name(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(anomaly._signed(meta, pickle.dumps(_Plant()), KEY))
    return path


# --- Training and scoring ------------------------------------------------------------------------


def test_train_records_metadata(model):
    """A trained model carries its stream, features, threshold, sample count and versions."""
    meta = model.meta
    assert (meta.stream, meta.version, meta.algorithm) == ("sensors", 0, "hbos")
    assert meta.features == FEATURES
    assert meta.samples == 2000
    assert meta.contamination == 0.01
    assert meta.threshold == float(model.detector.threshold_)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta.trained_at)
    assert meta.pyod_version == anomaly.metadata.version("pyod")
    assert model.model_id == "sensors@v0000"


@pytest.mark.parametrize("feature", range(3), ids=FEATURES)
@pytest.mark.parametrize("sign", [1, -1], ids=["high", "low"])
def test_five_sigma_spike_is_above_threshold(model, feature, sign):
    """A value 5 sigma from its field's mean, the others at theirs, scores above the threshold."""
    row = MEANS.copy()
    row[feature] += sign * 5 * SIGMAS[feature]
    [score] = anomaly.score(model, [row.tolist()])
    assert model.is_outlier(score), (score, model.meta.threshold)


def test_normal_records_are_rarely_flagged(model):
    """Fresh normal records are flagged at about the contamination rate (here under 3 %)."""
    scores = anomaly.score(model, normal_rows(2000, seed=2))
    flagged = sum(model.is_outlier(s) for s in scores)
    assert flagged / len(scores) < 0.03


def test_score_is_one_per_row_and_empty_for_no_rows(model):
    """score returns one float per row, in order, and [] for an empty batch."""
    rows = normal_rows(5, seed=3)
    scores = anomaly.score(model, rows)
    assert len(scores) == 5
    assert all(isinstance(s, float) for s in scores)
    assert scores == [anomaly.score(model, [row])[0] for row in rows]
    assert anomaly.score(model, []) == []


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[1.0, 2.0]], r"rows\[0\] has 2 values; expected 3"),
        ([[1.0, 2.0, math.nan]], r"rows\[0\] latency_ms: nan is not finite"),
        ([[1.0, 2.0, "x"]], "numbers only"),
    ],
    ids=["wrong width", "nan", "not a number"],
)
def test_score_refuses_bad_rows(model, rows, message):
    """score refuses rows of the wrong width or with a non-finite or non-numeric value."""
    with pytest.raises(ValueError, match=message):
        anomaly.score(model, rows)


ROWS = normal_rows(60, seed=4)


@pytest.mark.parametrize(
    ("rows", "changes", "message"),
    [
        (ROWS[:49], {}, "at least 50 rows, got 49"),
        ([*ROWS[:59], [1.0, math.inf, 2.0]], {}, r"rows\[59\] humidity: inf is not finite"),
        ([*ROWS[:59], [1.0, math.nan, 2.0]], {}, r"rows\[59\] humidity: nan is not finite"),
        ([*ROWS[:59], [1.0, 2.0]], {}, r"rows\[59\] has 2 values; expected 3"),
        (ROWS, {"contamination": 0.0}, r"contamination must be in \(0, 0.5\]"),
        (ROWS, {"contamination": 0.51}, r"contamination must be in \(0, 0.5\]"),
        (ROWS, {"contamination": -0.1}, r"contamination must be in \(0, 0.5\]"),
        (ROWS, {"algorithm": "lof"}, "algorithm 'lof' is unknown"),
        (ROWS, {"stream": "../etc"}, "stream '../etc' must be"),
        (ROWS, {"stream": ""}, "stream '' must be"),
        (ROWS, {"features": ()}, "at least one field"),
        (ROWS, {"features": ("a", "a", "b")}, "duplicate names"),
    ],
    ids=[
        "49 rows", "inf", "nan", "short row", "contamination 0", "contamination 0.51",
        "negative contamination", "unknown algorithm", "stream escapes", "empty stream",
        "no features", "duplicate features",
    ],
)  # fmt: skip
def test_train_refuses_bad_input(rows, changes, message):
    """train refuses too few rows, non-finite values, bad widths and bad settings, saying which."""
    arguments = {"stream": "sensors", "features": FEATURES, **changes}
    with pytest.raises(ValueError, match=message):
        anomaly.train(rows, **arguments)


@pytest.mark.parametrize("algorithm", ["iforest", "ecod", "copod"])
def test_other_algorithms_round_trip(models_dir, algorithm):
    """Every other algorithm trains, saves and loads with the same scores."""
    trained = anomaly.train(normal_rows(300, 5), stream="s", features=FEATURES, algorithm=algorithm)
    loaded = anomaly.load(anomaly.save(trained, models_dir, KEY), KEY)
    rows = normal_rows(10, seed=6)
    assert loaded.meta.algorithm == algorithm
    assert anomaly.score(loaded, rows) == anomaly.score(trained, rows)


def test_iforest_is_reproducible_with_a_seed():
    """IForest with the same seed gives the same scores; another seed gives other scores."""
    rows = normal_rows(300, 7)

    def trained(seed: int) -> list[float]:
        fitted = anomaly.train(rows, stream="s", features=FEATURES, algorithm="iforest", seed=seed)
        return anomaly.score(fitted, rows[:20])

    assert trained(1) == trained(1)
    assert trained(1) != trained(2)


# --- Model files ---------------------------------------------------------------------------------


def test_save_and_load_round_trip(model, models_dir):
    """A saved model loads with the same metadata (now version 1) and the same scores."""
    path = anomaly.save(model, models_dir, KEY)
    loaded = anomaly.load(path, KEY)
    assert path == models_dir / "sensors" / "v0001.model"
    assert loaded.meta == replace(model.meta, version=1)
    assert loaded.model_id == "sensors@v0001"
    rows = normal_rows(50, seed=8)
    assert anomaly.score(loaded, rows) == anomaly.score(model, rows)
    assert anomaly.read_meta(path, KEY) == loaded.meta


def test_file_starts_with_magic_metadata_and_hmac(model, models_dir):
    """The file is the magic line, one line of canonical JSON metadata, the HMAC hex, the pickle."""
    blob = anomaly.save(model, models_dir, KEY).read_bytes()
    magic, meta_line, mac, payload = blob.split(b"\n", 3)
    assert magic == b"EMP-MODEL 1"
    assert json.loads(meta_line)["stream"] == "sensors"
    assert meta_line == replace(model.meta, version=1).canonical_json()
    assert re.fullmatch(rb"[0-9a-f]{64}", mac)
    assert payload == pickle.dumps(model.detector, protocol=pickle.HIGHEST_PROTOCOL)


def test_versions_increment_and_latest_is_the_highest(model, models_dir):
    """Each save takes the next free version; latest() returns the highest; files are 0600."""
    assert anomaly.latest(models_dir, "sensors") is None
    paths = [anomaly.save(model, models_dir, KEY) for _ in range(3)]
    assert [p.name for p in paths] == ["v0001.model", "v0002.model", "v0003.model"]
    assert anomaly.latest(models_dir, "sensors") == paths[-1]
    assert anomaly.read_meta(paths[-1], KEY).version == 3
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(paths[0].parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [
        ".save.lock", "v0001.model", "v0002.model", "v0003.model",
    ]  # fmt: skip


def test_latest_ignores_other_files_and_orders_numerically(model, models_dir):
    """latest() skips temp and foreign files, and v10000 comes after v9999."""
    stream_dir = models_dir / "sensors"
    stream_dir.mkdir(parents=True)
    for name in ("v9999.model", "v10000.model", ".v10001.model.x.tmp", "notes.txt", "v1.model"):
        (stream_dir / name).write_bytes(b"")
    assert anomaly.latest(models_dir, "sensors") == stream_dir / "v10000.model"
    assert anomaly.latest(models_dir, "other") is None


def test_concurrent_saves_take_distinct_versions(model, models_dir):
    """Saves from several threads at once never overwrite each other's version."""
    saved: list[Path] = []

    def save_twice() -> None:
        saved.extend(anomaly.save(model, models_dir, KEY) for _ in range(2))

    threads = [threading.Thread(target=save_twice) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(p.name for p in saved) == [f"v{v:04d}.model" for v in range(1, 7)]


def test_planted_payload_is_unpickled_when_signed(models_dir, tmp_path):
    """Control: a correctly signed planted file is unpickled (so the marker checks below work)."""
    marker = tmp_path / "unpickled"
    with pytest.raises(ModelError, match="is not a hbos detector"):
        anomaly.load(planted(models_dir, marker), KEY)
    assert marker.exists()


def _flip(offset_of):
    def tamper(path: Path) -> None:
        blob = bytearray(path.read_bytes())
        blob[offset_of(bytes(blob))] ^= 0x01
        path.write_bytes(bytes(blob))

    return tamper


def _rewrite(change):
    def tamper(path: Path) -> None:
        path.write_bytes(change(path.read_bytes()))

    return tamper


def _lines(blob: bytes) -> list[bytes]:
    return blob.split(b"\n", 3)  # magic, metadata, HMAC, payload


def _swap_hmac(path: Path) -> None:
    other = anomaly._signed(anomaly.read_meta(path, KEY), b"another payload", KEY)
    magic, meta, _, payload = _lines(path.read_bytes())
    path.write_bytes(b"\n".join([magic, meta, _lines(other)[2], payload]))


def _rename(path: Path) -> None:
    path.rename(path.with_name("v0002.model"))


def _move_stream(path: Path) -> None:
    (path.parent.parent / "other").mkdir()
    path.rename(path.parent.parent / "other" / path.name)


TAMPERING = [
    ("flip a metadata byte", _flip(lambda b: b.index(b'"algorithm"') + 2), "HMAC mismatch"),
    ("flip a payload byte", _flip(lambda b: len(b) - 3), "HMAC mismatch"),
    ("flip an HMAC digit", _flip(lambda b: len(b"\n".join(_lines(b)[:2])) + 5), "HMAC mismatch"),
    ("truncate the payload", _rewrite(lambda b: b[:-10]), "HMAC mismatch"),
    ("truncate to the header", _rewrite(lambda b: b[:20]), "truncated model file"),
    ("append a byte", _rewrite(lambda b: b + b"."), "HMAC mismatch"),
    ("swap in another file's HMAC", _swap_hmac, "HMAC mismatch"),
    ("drop the HMAC line", _rewrite(lambda b: b"\n".join(_lines(b)[:2] + _lines(b)[3:])), "HMAC"),
    ("wrong magic", _rewrite(lambda b: b"EMP-MODEL 2" + b[11:]), "not a model file"),
    ("empty file", _rewrite(lambda b: b""), "not a model file"),
]


@pytest.mark.parametrize(
    ("tamper", "message"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_tampered_file_is_refused_before_unpickling(models_dir, tmp_path, tamper, message):
    """Any change to a signed file is a ModelError naming the file; nothing is unpickled."""
    marker = tmp_path / "unpickled"
    path = planted(models_dir, marker)
    tamper(path)
    for read in (anomaly.load, anomaly.read_meta):
        with pytest.raises(ModelError, match=message) as refused:
            read(path, KEY)
        assert str(path) in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("move", "message"),
    [
        (_rename, r"holds sensors@v0001; its name says sensors@v0002"),
        (_move_stream, "its name says other@v0001"),
    ],
    ids=["renamed to another version", "moved to another stream"],
)
def test_signed_file_under_another_name_is_refused(models_dir, tmp_path, move, message):
    """A correctly signed file whose name or directory disagrees with its metadata is refused."""
    marker = tmp_path / "unpickled"
    path = planted(models_dir, marker)
    move(path)
    [moved] = (models_dir).glob("*/v*.model")
    with pytest.raises(ModelError, match=message):
        anomaly.load(moved, KEY)
    assert not marker.exists()


def test_wrong_key_is_refused_before_unpickling(models_dir, tmp_path):
    """A file signed with another key is an HMAC mismatch; nothing is unpickled."""
    marker = tmp_path / "unpickled"
    path = planted(models_dir, marker)
    with pytest.raises(ModelError, match="HMAC mismatch"):
        anomaly.load(path, secrets.token_bytes(32))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sklearn_version": "0.0.1"}, "trained with scikit-learn 0.0.1, this is .*; retrain"),
        ({"pyod_version": "0.0.1"}, "trained with pyod 0.0.1"),
        ({"algorithm": "lof"}, "metadata algorithm is not valid"),
        ({"samples": 10}, "metadata samples is not valid"),
        ({"features": ("a", "a")}, "metadata features is not valid"),
    ],
    ids=[
        "other scikit-learn",
        "other pyod",
        "unknown algorithm",
        "too few samples",
        "duplicate features",
    ],
)
def test_signed_unusable_metadata_is_refused_before_unpickling(
    models_dir, tmp_path, changes, message
):
    """Signed metadata from another library version, or out of range, is refused unpickled."""
    marker = tmp_path / "unpickled"
    path = planted(models_dir, marker, **changes)
    with pytest.raises(ModelError, match=message):
        anomaly.load(path, KEY)
    assert not marker.exists()


def _resign(path: Path, old: bytes, new: bytes) -> None:
    magic, meta, _, payload = _lines(path.read_bytes())
    meta_line = meta.replace(old, new) + b"\n"
    mac = anomaly._mac(KEY, meta_line, payload)
    path.write_bytes(magic + b"\n" + meta_line + mac + b"\n" + payload)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b'"threshold":1.0', b'"threshold":Infinity', "metadata threshold is not valid"),
        (b'"threshold":1.0', b'"threshold":1.0,"extra":1', "metadata must hold exactly"),
        (b'"threshold":1.0,', b"", "metadata must hold exactly"),
        (b"{", b"[", "the metadata line is not JSON"),
        (b'"version":1', b'"version":true', "metadata version is not valid"),
    ],
    ids=["infinite threshold", "extra key", "missing key", "not JSON", "boolean version"],
)
def test_signed_malformed_metadata_is_refused_before_unpickling(
    models_dir, tmp_path, old, new, message
):
    """A signed metadata line that is not exactly the expected document is refused unpickled."""
    marker = tmp_path / "unpickled"
    path = planted(models_dir, marker)
    _resign(path, old, new)
    with pytest.raises(ModelError, match=message):
        anomaly.load(path, KEY)
    assert not marker.exists()


@pytest.mark.parametrize("key", [b"", b"short", "a" * 32], ids=["empty", "short", "str"])
def test_save_and_load_refuse_a_weak_key(model, models_dir, key):
    """A key shorter than 32 bytes (or not bytes) is refused for saving and loading."""
    with pytest.raises(ModelError, match="at least 32 bytes"):
        anomaly.save(model, models_dir, key)
    with pytest.raises(ModelError, match="at least 32 bytes"):
        anomaly.load(models_dir / "sensors" / "v0001.model", key)


def test_missing_model_file_is_a_model_error(models_dir):
    """Loading a file that does not exist is a ModelError naming it."""
    path = models_dir / "sensors" / "v0001.model"
    with pytest.raises(ModelError, match=re.escape(str(path))):
        anomaly.load(path, KEY)


# --- The signing key -----------------------------------------------------------------------------


def test_ensure_key_creates_once_and_then_reads(tmp_path):
    """ensure_key writes 32 random bytes as hex, 0600, and returns the same key afterwards."""
    path = tmp_path / "keys" / "model.key"
    key = anomaly.ensure_key(path)
    assert len(key) == 32
    assert path.read_text(encoding="ascii") == key.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert anomaly.ensure_key(path) == key
    assert anomaly.load_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["model.key"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "model key missing"),
        ("", 0o600, "model key file is empty"),
        ("ab" * 16, 0o600, "model key is 16 bytes; it needs 32"),
        ("zz" * 32, 0o600, "model key is not hex"),
        ("ab" * 32, 0o640, "open to group or others \\(mode 640\\)"),
        ("ab" * 32, 0o604, "open to group or others \\(mode 604\\)"),
        ("ab" * 32, 0o620, "open to group or others \\(mode 620\\)"),
    ],
    ids=[
        "missing",
        "empty",
        "short",
        "not hex",
        "group-readable",
        "world-readable",
        "group-writable",
    ],
)
def test_load_key_refuses_unusable_files(tmp_path, content, mode, message):
    """load_key refuses a missing, empty, short, non-hex or shared key file, naming it."""
    path = tmp_path / "model.key"
    if content is not None:
        path.write_text(content, encoding="ascii")
        path.chmod(mode)
    with pytest.raises(ModelError, match=message) as refused:
        anomaly.load_key(path)
    assert str(path) in str(refused.value)
    assert "ab" * 16 not in str(refused.value)  # never the key material


# --- Import cost ---------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_pyod():
    """Importing gateway.validation.anomaly loads neither pyod nor numpy, sklearn or numba."""
    code = (
        "import json, sys, gateway.validation.anomaly\n"
        "heavy = {'pyod', 'numpy', 'sklearn', 'numba', 'scipy'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == []
