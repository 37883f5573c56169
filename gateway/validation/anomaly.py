"""Outlier models for ingest streams: train a pyod detector, score records, keep signed model files.

Never imports pyod, numpy or scikit-learn at module import (pyod's import alone costs ~2 s):
only the functions that train, load or score a model do. Never unpickles a file whose HMAC
has not been verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import math
import os
import pickle  # nosec B403  # only payloads whose HMAC was verified are unpickled (see load)
import re
import secrets
import stat
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from empsecrets import files

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.keys import ResolvedSecret

ALGORITHMS: tuple[str, ...] = ("hbos", "iforest", "ecod", "copod", "mcd")
DEFAULT_ALGORITHM = "hbos"
DEFAULT_CONTAMINATION = 0.01
MAX_CONTAMINATION = 0.5  # pyod's own bound: more than half outliers is not an outlier model
MIN_ROWS = 50
KEY_BYTES = 32
MAGIC = b"EMP-MODEL 1\n"
LOCK_FILE = ".save.lock"
_DETECTORS: dict[str, tuple[str, str]] = {
    "hbos": ("pyod.models.hbos", "HBOS"),
    "iforest": ("pyod.models.iforest", "IForest"),
    "ecod": ("pyod.models.ecod", "ECOD"),
    "copod": ("pyod.models.copod", "COPOD"),
    # Minimum covariance determinant: a robust Gaussian over all features at once, the only one
    # here that sees broken correlations ("impossible combinations") in bench/eval_anomaly.py.
    "mcd": ("pyod.models.mcd", "MCD"),
}
# HBOS, tuned with bench/eval_anomaly.py (5,000 sensor records, contamination 0.01, 8 seeds).
# pyod's defaults (10 bins, alpha 0.1) caught ~10 % of 5-sigma spikes: a value past the
# histogram scores only like the rarest bin, and alpha 0.1 drowns every density below ~0.1 (all
# of them, for a feature spread over more than a few units). With a negligible alpha, a value in
# an empty bin or past the histogram scores -log2(alpha), far above any training record, and
# sqrt(n) bins (the square-root rule) leave empty bins in the tails: 5-sigma recall 1.0 on every
# seed, false positives 1.0-1.8 %. A fixed count suits one size only: 50 bins caught 0.81-1.0 of
# 5-sigma spikes at 5,000 records; 100 bins flagged 5 % of normal records at 1,000. alpha must
# stay below the density of a one-record bin, 1 / (records x bin width): at 5,000 records, true
# for features spanning up to ~10^10 units.
HBOS_ALPHA = 1e-12
HBOS_TOL = 0.5
HBOS_MIN_BINS = 10
_VERSIONS = (("pyod_version", "pyod"), ("sklearn_version", "scikit-learn"))
_FILE_NAME = re.compile(r"v(\d{4,})\.model")
_STREAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a directory name: no "/" and no ".."


class ModelError(Exception):
    """A model or key file that cannot be used: missing, unsigned, tampered or mismatched."""


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """What a model file says about its model; version is 0 until the model is saved."""

    stream: str
    version: int
    algorithm: str
    features: tuple[str, ...]
    contamination: float
    threshold: float
    trained_at: str
    samples: int
    pyod_version: str
    sklearn_version: str
    numpy_version: str

    @property
    def model_id(self) -> str:
        """The stream and version, as in logs and audit events: "sensors@v0003"."""
        return f"{self.stream}@v{self.version:04d}"

    def canonical_json(self) -> bytes:
        """The metadata as one line of canonical JSON (sorted keys, no spaces, ASCII)."""
        text = json.dumps(
            asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
        return text.encode("ascii")


@dataclass(frozen=True)
class TrainedModel:
    """A fitted pyod detector and its metadata; is_outlier(score) applies its threshold."""

    detector: Any = field(repr=False, compare=False)
    meta: ModelMeta
    # ECOD and COPOD keep per-call state on the detector (they re-rank the batch with the
    # training data), so two threads scoring one model at once could read each other's ranks.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def model_id(self) -> str:
        """The stream and version: "sensors@v0003"."""
        return self.meta.model_id

    def is_outlier(self, score: float) -> bool:
        """Whether a score from score() is above the model's threshold."""
        return score > self.meta.threshold


def train(
    rows: Sequence[Sequence[float]],
    *,
    stream: str,
    features: Sequence[str],
    algorithm: str = DEFAULT_ALGORITHM,
    contamination: float = DEFAULT_CONTAMINATION,
    seed: int = 0,
) -> TrainedModel:
    """A detector fitted on rows (one value per feature); bad input is a ValueError naming it."""
    _check_stream(stream)
    names = _check_features(features)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown; use one of {list(ALGORITHMS)}")
    if not _is_contamination(contamination):
        raise ValueError(f"contamination must be in (0, {MAX_CONTAMINATION}], not {contamination}")
    if len(rows) < MIN_ROWS:
        raise ValueError(f"training needs at least {MIN_ROWS} rows, got {len(rows)}")
    matrix = _matrix(rows, names)
    detector = _new_detector(algorithm, contamination, seed, len(rows))
    detector.fit(matrix)
    meta = ModelMeta(
        stream=stream,
        version=0,
        algorithm=algorithm,
        features=names,
        contamination=float(contamination),
        threshold=float(detector.threshold_),
        trained_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        samples=len(rows),
        pyod_version=metadata.version("pyod"),
        sklearn_version=metadata.version("scikit-learn"),
        numpy_version=metadata.version("numpy"),
    )
    return TrainedModel(detector=detector, meta=meta)


def score(model: TrainedModel, rows: Sequence[Sequence[float]]) -> list[float]:
    """One outlier score per row (higher is more unusual), from one call for the whole batch."""
    if len(rows) == 0:  # not `not rows`: a numpy array has no truth value
        return []
    matrix = _matrix(rows, model.meta.features)
    with model._lock:  # noqa: SLF001 - the model's own lock, see TrainedModel
        scores = model.detector.decision_function(matrix)
    return [float(value) for value in scores]


def _check_stream(stream: str) -> None:
    # The stream names a directory under the model directory: "../x" must not escape it.
    if not isinstance(stream, str) or not _STREAM.fullmatch(stream):
        raise ValueError(
            f"stream {stream!r} must be 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    names = tuple(features)
    if not names:
        raise ValueError("features must name at least one field")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"features: {name!r} is not a field name")
    if len(set(names)) != len(names):
        raise ValueError(f"features: duplicate names in {list(names)}")
    return names


def _is_contamination(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return 0 < value <= MAX_CONTAMINATION


def _matrix(rows: Sequence[Sequence[float]], features: tuple[str, ...]) -> Any:
    """The rows as a float64 array, once every row's width and every value is checked."""
    import numpy as np  # noqa: PLC0415 - lazy, see the module docstring

    width = len(features)
    for index, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"rows[{index}] has {len(row)} values; expected {width} ({', '.join(features)})"
            )
    try:
        matrix = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("rows must hold numbers only") from None
    finite = np.isfinite(matrix)
    if not finite.all():
        bad_row, bad_column = (int(i) for i in np.argwhere(~finite)[0])
        value = matrix[bad_row, bad_column]
        raise ValueError(f"rows[{bad_row}] {features[bad_column]}: {value} is not finite")
    return matrix


def _detector_class(algorithm: str) -> Any:
    module, name = _DETECTORS[algorithm]
    return getattr(importlib.import_module(module), name)


def _new_detector(algorithm: str, contamination: float, seed: int, samples: int) -> Any:
    detector_class = _detector_class(algorithm)
    if algorithm == "hbos":
        bins = max(HBOS_MIN_BINS, round(math.sqrt(samples)))
        return detector_class(
            n_bins=bins, alpha=HBOS_ALPHA, tol=HBOS_TOL, contamination=contamination
        )
    if algorithm in {"iforest", "mcd"}:
        return detector_class(contamination=contamination, random_state=seed)
    return detector_class(contamination=contamination)


# --- Model files --------------------------------------------------------------------------------


def model_file_name(version: int) -> str:
    """The file name of a version: v0001.model, ..., v9999.model, v10000.model."""
    return f"v{version:04d}.model"


def versions(directory: Path, stream: str) -> list[Path]:
    """The stream's model files, oldest version first (empty when there are none)."""
    _check_stream(stream)
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in (directory / stream).iterdir():
            match = _FILE_NAME.fullmatch(path.name)
            if match is not None:
                found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest(directory: Path, stream: str) -> Path | None:
    """The stream's highest-versioned model file, or None when it has none."""
    listed = versions(directory, stream)
    return listed[-1] if listed else None


def save(model: TrainedModel, directory: Path, key: bytes) -> Path:
    """Write model as its stream's next version, signed with key, and return the new file."""
    _check_key(key)
    payload = pickle.dumps(model.detector, protocol=pickle.HIGHEST_PROTOCOL)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stream_dir = directory / model.meta.stream
    stream_dir.mkdir(mode=0o700, exist_ok=True)
    stream_dir.chmod(0o700)  # mkdir's mode goes through the umask
    with files.exclusive_lock(stream_dir / LOCK_FILE):
        # Inside the lock: two saves that both listed the directory would pick the same version.
        current = latest(directory, model.meta.stream)
        version = 1 if current is None else _version_of(current) + 1
        meta = replace(model.meta, version=version)
        path = stream_dir / model_file_name(version)
        files.write_private(path, _signed(meta, payload, key))
    return path


def load(path: Path, key: bytes) -> TrainedModel:
    """The model in path, unpickled only after its HMAC checks; ModelError if it is not usable."""
    _check_key(key)
    meta, payload = _read_verified(path, key)
    for name, package in _VERSIONS:
        # scikit-learn supports unpickling an estimator only in the version that pickled it.
        running = metadata.version(package)
        if getattr(meta, name) != running:
            raise ModelError(
                f"{path}: trained with {package} {getattr(meta, name)}, this is {running}; "
                "retrain the model"
            )
    detector_class = _detector_class(meta.algorithm)
    try:
        detector = pickle.loads(payload)  # noqa: S301  # nosec B301  # its HMAC was verified above
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same: unusable
        raise ModelError(f"{path}: the signed payload does not unpickle ({exc!r})") from None
    if not isinstance(detector, detector_class):
        raise ModelError(f"{path}: the payload is not a {meta.algorithm} detector")
    model = TrainedModel(detector=detector, meta=meta)
    # HBOS compiles its numba kernel on its first call (~5 s here): pay it now, at load,
    # rather than on the first record scored.
    score(model, [[0.0] * len(meta.features)])
    return model


def read_meta(path: Path, key: bytes) -> ModelMeta:
    """The metadata of a model file, after checking its HMAC, without unpickling the model."""
    _check_key(key)
    meta, _ = _read_verified(path, key)
    return meta


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < KEY_BYTES:
        raise ModelError(f"the model key must be at least {KEY_BYTES} bytes")


def _version_of(path: Path) -> int:
    match = _FILE_NAME.fullmatch(path.name)
    if match is None:
        raise ModelError(f"{path}: a model file is named like v0001.model")
    return int(match.group(1))


def _mac(key: bytes, meta_line: bytes, payload: bytes) -> bytes:
    digest = hmac.new(key, MAGIC, hashlib.sha256)
    digest.update(meta_line)
    digest.update(payload)
    return digest.hexdigest().encode("ascii")


def _signed(meta: ModelMeta, payload: bytes, key: bytes) -> bytes:
    """The file: magic line, metadata line, HMAC line over (magic + metadata line + payload)."""
    meta_line = meta.canonical_json() + b"\n"
    return MAGIC + meta_line + _mac(key, meta_line, payload) + b"\n" + payload


def _read_verified(path: Path, key: bytes) -> tuple[ModelMeta, bytes]:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror})") from None
    if not blob.startswith(MAGIC):
        raise ModelError(f"{path}: not a model file (no {MAGIC.strip().decode()} header)")
    meta_end = blob.find(b"\n", len(MAGIC)) + 1
    mac_end = blob.find(b"\n", meta_end) + 1 if meta_end else 0
    if not mac_end:
        raise ModelError(f"{path}: truncated model file (no metadata or HMAC line)")
    meta_line = blob[len(MAGIC) : meta_end]
    payload = blob[mac_end:]
    # Verify before parsing anything else: from here on every byte is one this gateway wrote.
    if not hmac.compare_digest(blob[meta_end : mac_end - 1], _mac(key, meta_line, payload)):
        raise ModelError(
            f"{path}: HMAC mismatch: the file was changed, truncated or signed with another key"
        )
    meta = _parse_meta(meta_line, path)
    # A signed file under another name or stream (a copy, a rollback by rename) is refused:
    # latest() must return what was saved as that version of that stream.
    if _version_of(path) != meta.version or path.parent.name != meta.stream:
        raise ModelError(
            f"{path}: the file holds {meta.model_id}; its name says {path.parent.name}@{path.stem}"
        )
    return meta, payload


def _parse_meta(line: bytes, path: Path) -> ModelMeta:
    try:
        document = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: the metadata line is not JSON") from None
    expected = {item.name for item in fields(ModelMeta)}
    if not isinstance(document, dict) or set(document) != expected:
        raise ModelError(f"{path}: the metadata must hold exactly {sorted(expected)}")
    checks: dict[str, Any] = {
        "stream": lambda v: isinstance(v, str) and _STREAM.fullmatch(v),
        "version": lambda v: _is_int(v) and v >= 1,
        "algorithm": lambda v: v in ALGORITHMS,
        "features": lambda v: isinstance(v, list) and _features_ok(v),
        "contamination": _is_contamination,
        "threshold": lambda v: isinstance(v, int | float) and math.isfinite(v),
        "trained_at": lambda v: isinstance(v, str) and v.endswith("Z"),
        "samples": lambda v: _is_int(v) and v >= MIN_ROWS,
    }
    for item in fields(ModelMeta):
        check = checks.get(item.name, lambda v: isinstance(v, str) and v)  # the versions
        if not check(document[item.name]):
            raise ModelError(f"{path}: metadata {item.name} is not valid")
    document["features"] = tuple(document["features"])
    return ModelMeta(**document)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _features_ok(names: list[Any]) -> bool:
    try:
        _check_features(names)
    except ValueError:
        return False
    return True


def load_key(path: Path) -> bytes:
    """The model signing key in path (hex, 0600); missing, short or shared is a ModelError."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ModelError(f"{path}: model key missing; create it with ensure_key") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model key ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        # Whoever can read the key can sign a model, and a signed model is unpickled.
        if mode & 0o077:
            raise ModelError(
                f"{path}: model key is open to group or others (mode {mode:o}); chmod 600 it"
            )
        content = handle.read()
    if not content.strip():
        raise ModelError(f"{path}: model key file is empty")
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: model key is not hex") from None  # never echo the content
    return parse_key(text, str(path))


def parse_key(text: str, source: str) -> bytes:
    """The model signing key in hex text from source (a file or a secret reference).

    Short or not hex is a ModelError naming source, never the text.
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ModelError(f"{source}: model key is not hex") from None  # never echo the content
    if len(key) < KEY_BYTES:
        raise ModelError(f"{source}: model key is {len(key)} bytes; it needs {KEY_BYTES}")
    return key


def new_key() -> str:
    """A new model signing key as its reader expects it: 32 random bytes, hex."""
    return secrets.token_hex(KEY_BYTES)


def read_key(key: ResolvedSecret) -> bytes:
    """The model key, resolved again from its reference: a rotated key serves the next load.

    Called in a thread at each model load, never per record; failures are ModelErrors.
    """
    from empsecrets.providers import SecretError  # noqa: PLC0415 - on use, like the rest

    try:
        secret = key.reload()
    except SecretError as exc:
        raise ModelError(str(exc)) from None
    return parse_key(secret.value, secret.source)


def ensure_key(path: Path) -> bytes:
    """The model signing key in path, created (32 random bytes, hex, 0600) if it is missing."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(new_key() + "\n")
            # link, not replace: when two processes race, the first key stays and both use it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return load_key(path)
