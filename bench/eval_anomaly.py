"""Detection quality of the ingest outlier models (gateway/validation/anomaly.py), measured on a
synthetic sensor stream with labelled outliers beside per-field IQR, z-score and robust-z checks,
and the cost of scoring one record and a batch of 100.

The stream: temperature N(21, 2); humidity N(45, 8); power_w = 50 + 12 x temperature + N(0, 10)
(so N(302, 26) on its own); latency_ms lognormal (median 20 ms, sigma 0.4 in log space; its
"sigma" below is the log-space one). The models learn from a history of normal records; the test
stream is normal records with injected outliers of known kinds:

- point spikes: one field set to its mean +-3, 4 or 5 sigma, the other fields normal;
- drift: runs of consecutive records where one field's reading drifts from +2 to +4 sigma;
- impossible combinations: temperature 1.5-2 sigma high with power 1.5-2 sigma low, or the
  reverse. Each value is inside its field's normal range; only the correlation is broken.

Exits 0 whenever it ran: a missed target is a finding, reported, not a failure.

    .venv/bin/python bench/eval_anomaly.py [--quick] [--seed N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from loadgen import percentile

from gateway.validation import anomaly

if TYPE_CHECKING:
    from collections.abc import Callable

FIELDS = ("temperature", "humidity", "power_w", "latency_ms")
# Each field's marginal centre and sigma (latency in log space): spikes and drift move a field
# in these units, so "5 sigma" means the same thing for every field.
CENTRE = np.array([21.0, 45.0, 50.0 + 12.0 * 21.0, math.log(20.0)])
SIGMA = np.array([2.0, 8.0, math.hypot(12.0 * 2.0, 10.0), 0.4])
LOG_FIELD = 3
SPIKE_SIGMAS = (3, 4, 5)
KINDS = ("3-sigma", "4-sigma", "5-sigma", "drift", "combination")  # spikes first
BATCH = 100
RECALL_TARGET = 0.9
FP_TARGET = 0.02


@dataclass(frozen=True)
class Sizes:
    """How many records of each kind to generate, and how long to time each scoring call."""

    history: int = 5_000
    normal: int = 5_000
    spikes_per_level: int = 200
    drift_runs: int = 8
    drift_length: int = 50
    combinations: int = 200
    timing_seconds: float = 3.0

    @classmethod
    def quick(cls) -> Sizes:
        """A smoke run: fewer records (noisier figures) and shorter timing."""
        return cls(2_000, 2_000, 80, 4, 40, 80, 0.4)


@dataclass(frozen=True)
class Stream:
    """The training history and the labelled test stream, in arrival order."""

    history: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # "normal" or one of KINDS per test record


@dataclass(frozen=True)
class Quality:
    """One method's figures on the test stream."""

    method: str
    precision: float
    recall: dict[str, float]
    overall_recall: float
    false_positive_rate: float


@dataclass(frozen=True)
class Cost:
    """Scoring cost of one model, in microseconds per record."""

    algorithm: str
    single_p50_us: float
    single_p95_us: float
    batch_p50_us: float
    batch_p95_us: float
    raw_single_p50_us: float  # decision_function alone, without score()'s checks


# --- The synthetic stream ------------------------------------------------------------------------


def normal_records(rng: np.random.Generator, count: int) -> np.ndarray:
    """Normal sensor records, one row per record in FIELDS order."""
    temperature = rng.normal(21.0, 2.0, count)
    humidity = rng.normal(45.0, 8.0, count)
    power = 50.0 + 12.0 * temperature + rng.normal(0.0, 10.0, count)
    latency = rng.lognormal(math.log(20.0), 0.4, count)
    return np.column_stack([temperature, humidity, power, latency])


def to_sigmas(rows: np.ndarray) -> np.ndarray:
    """Each value as sigmas from its field's centre (latency in log space)."""
    values = rows.copy()
    values[:, LOG_FIELD] = np.log(values[:, LOG_FIELD])
    return (values - CENTRE) / SIGMA


def from_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """The inverse of to_sigmas."""
    values = sigmas * SIGMA + CENTRE
    values[:, LOG_FIELD] = np.exp(values[:, LOG_FIELD])
    return values


def spikes(rng: np.random.Generator, count: int, sigmas: float) -> np.ndarray:
    """Normal records with one field (in turn, high and low in turn) set to +-sigmas."""
    z = to_sigmas(normal_records(rng, count))
    for index in range(count):
        field = index % len(FIELDS)
        sign = 1.0 if (index // len(FIELDS)) % 2 == 0 else -1.0
        z[index, field] = sign * sigmas
    return from_sigmas(z)


def drift_run(rng: np.random.Generator, length: int, field: int) -> np.ndarray:
    """Consecutive normal records whose field reads 2 sigma high at first and 4 sigma at last."""
    z = to_sigmas(normal_records(rng, length))
    z[:, field] += np.linspace(2.0, 4.0, length)
    return from_sigmas(z)


def combinations(rng: np.random.Generator, count: int) -> np.ndarray:
    """Normal records with temperature 1.5-2 sigma high and power as far low, or the reverse."""
    z = to_sigmas(normal_records(rng, count))
    offsets = rng.uniform(1.5, 2.0, size=(count, 2))
    signs = np.where(np.arange(count) % 2 == 0, 1.0, -1.0)
    z[:, 0] = signs * offsets[:, 0]
    z[:, 2] = -signs * offsets[:, 1]
    return from_sigmas(z)


def make_stream(seed: int, sizes: Sizes) -> Stream:
    """History and test stream: spikes and combinations scattered, drift runs kept together."""
    rng = np.random.default_rng(seed)
    history = normal_records(rng, sizes.history)
    parts = [normal_records(rng, sizes.normal)]
    labels = [np.full(sizes.normal, "normal", dtype=object)]
    for level in SPIKE_SIGMAS:
        parts.append(spikes(rng, sizes.spikes_per_level, level))
        labels.append(np.full(sizes.spikes_per_level, f"{level}-sigma", dtype=object))
    parts.append(combinations(rng, sizes.combinations))
    labels.append(np.full(sizes.combinations, "combination", dtype=object))
    order = rng.permutation(sum(len(p) for p in parts))
    test, test_labels = np.vstack(parts)[order], np.concatenate(labels)[order]
    for run in range(sizes.drift_runs):
        at = int(rng.integers(0, len(test)))
        drifted = drift_run(rng, sizes.drift_length, run % len(FIELDS))
        test = np.insert(test, at, drifted, axis=0)
        test_labels = np.insert(test_labels, at, ["drift"] * sizes.drift_length)
    return Stream(history, test, test_labels)


# --- The methods ---------------------------------------------------------------------------------


def iqr_flags(history: np.ndarray, test: np.ndarray, k: float) -> np.ndarray:
    """Tukey's fences per field: outside [Q1 - k IQR, Q3 + k IQR] in any field."""
    q1, q3 = np.percentile(history, [25, 75], axis=0)
    spread = q3 - q1
    outside = (test < q1 - k * spread) | (test > q3 + k * spread)
    return np.asarray(outside.any(axis=1))


def zscore_flags(history: np.ndarray, test: np.ndarray, limit: float) -> np.ndarray:
    """|x - mean| / stddev above limit in any field."""
    z = np.abs(test - history.mean(axis=0)) / history.std(axis=0, ddof=1)
    return np.asarray((z > limit).any(axis=1))


def robust_z_flags(history: np.ndarray, test: np.ndarray, limit: float) -> np.ndarray:
    """Iglewicz and Hoaglin's modified z, 0.6745 (x - median) / MAD, above limit in any field."""
    median = np.median(history, axis=0)
    mad = np.median(np.abs(history - median), axis=0)
    modified = 0.6745 * np.abs(test - median) / mad
    return np.asarray((modified > limit).any(axis=1))


def batched_scores(score: Callable[[np.ndarray], Any], test: np.ndarray) -> np.ndarray:
    """Scores for the test stream in arrival order, BATCH records per call (as on ingest)."""
    chunks = [np.asarray(score(test[at : at + BATCH])) for at in range(0, len(test), BATCH)]
    return np.concatenate(chunks)


def model_flags(model: anomaly.TrainedModel, test: np.ndarray) -> np.ndarray:
    """The model's verdicts through the gateway's own calls: anomaly.score and is_outlier."""
    scores = batched_scores(lambda rows: anomaly.score(model, rows.tolist()), test)
    return np.asarray(scores > model.meta.threshold)


def detector_flags(detector: Any, history: np.ndarray, test: np.ndarray) -> np.ndarray:
    """A bare pyod detector's verdicts: fit on history, threshold_ from its contamination."""
    detector.fit(history)
    return np.asarray(batched_scores(detector.decision_function, test) > detector.threshold_)


def quality(method: str, flags: np.ndarray, labels: np.ndarray) -> Quality:
    """Precision (for this mix of records), recall per kind and overall, false-positive rate."""
    normal = labels == "normal"
    flagged_outliers = int((flags & ~normal).sum())
    flagged = int(flags.sum())
    recall = {kind: float(flags[labels == kind].mean()) for kind in KINDS}
    return Quality(
        method=method,
        precision=flagged_outliers / flagged if flagged else math.nan,
        recall=recall,
        overall_recall=float(flags[~normal].mean()),
        false_positive_rate=float(flags[normal].mean()),
    )


def statistical_methods(stream: Stream) -> list[Quality]:
    """The per-field checks, a record flagged when any of its fields is."""
    history, test = stream.history, stream.test
    checks = [
        ("IQR fences k=1.5", iqr_flags(history, test, 1.5)),
        ("IQR fences k=3", iqr_flags(history, test, 3.0)),
        ("z-score |z|>3", zscore_flags(history, test, 3.0)),
        ("z-score |z|>4", zscore_flags(history, test, 4.0)),
        ("robust z >3.5 (MAD)", robust_z_flags(history, test, 3.5)),
    ]
    return [quality(name, flags, stream.labels) for name, flags in checks]


def train(stream: Stream, algorithm: str, seed: int) -> anomaly.TrainedModel:
    """A model from anomaly.train on the history, with the default contamination."""
    return anomaly.train(
        stream.history.tolist(),
        stream="sensors",
        features=FIELDS,
        algorithm=algorithm,
        contamination=anomaly.DEFAULT_CONTAMINATION,
        seed=seed,
    )


def hbos_settings(stream: Stream) -> list[Quality]:
    """The HBOS settings tried before choosing the default: pyod's own, and variations."""
    from pyod.models.hbos import HBOS  # noqa: PLC0415 - pyod loads in ~2 s; only here

    bins = max(anomaly.HBOS_MIN_BINS, round(math.sqrt(len(stream.history))))
    tried: list[tuple[str, dict[str, Any], float]] = [
        ("pyod defaults (10 bins, alpha 0.1)", {}, 0.01),
        ("10 bins, alpha 1e-12", {"n_bins": 10, "alpha": 1e-12}, 0.01),
        ("auto bins, alpha 1e-12", {"n_bins": "auto", "alpha": 1e-12}, 0.01),
        ("50 bins, alpha 1e-12", {"n_bins": 50, "alpha": 1e-12}, 0.01),
        ("100 bins, alpha 1e-12", {"n_bins": 100, "alpha": 1e-12}, 0.01),
        (f"sqrt(n)={bins} bins, alpha 0.1", {"n_bins": bins}, 0.01),
        (f"sqrt(n)={bins} bins, alpha 1e-12 (default)", {"n_bins": bins, "alpha": 1e-12}, 0.01),
        (f"sqrt(n)={bins} bins, alpha 1e-12, c=0.005", {"n_bins": bins, "alpha": 1e-12}, 0.005),
        (f"sqrt(n)={bins} bins, alpha 1e-12, c=0.02", {"n_bins": bins, "alpha": 1e-12}, 0.02),
    ]
    results = []
    for name, settings, contamination in tried:
        detector = HBOS(contamination=contamination, **settings)
        flags = detector_flags(detector, stream.history, stream.test)
        results.append(quality(f"HBOS {name}", flags, stream.labels))
    return results


# --- Scoring cost --------------------------------------------------------------------------------


def per_call_us(call: Callable[[], object], seconds: float, records: int) -> list[float]:
    """Microseconds per record of repeated calls for about `seconds` (at least 20), sorted."""
    for _ in range(5):
        call()
    samples: list[float] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)
    while len(samples) < 20 or clock() < deadline:
        started = clock()
        call()
        samples.append((clock() - started) / 1000.0 / records)
    samples.sort()
    return samples


def scoring_cost(model: anomaly.TrainedModel, stream: Stream, seconds: float) -> Cost:
    """One record per call and 100 per call, through anomaly.score; and the bare detector."""
    single = stream.test[:1].tolist()
    batch = stream.test[:BATCH].tolist()
    one_row = stream.test[:1]
    singles = per_call_us(lambda: anomaly.score(model, single), seconds, 1)
    batches = per_call_us(lambda: anomaly.score(model, batch), seconds, BATCH)
    raw = per_call_us(lambda: model.detector.decision_function(one_row), seconds / 2, 1)
    return Cost(
        algorithm=model.meta.algorithm,
        single_p50_us=percentile(singles, 50),
        single_p95_us=percentile(singles, 95),
        batch_p50_us=percentile(batches, 50),
        batch_p95_us=percentile(batches, 95),
        raw_single_p50_us=percentile(raw, 50),
    )


# --- Report --------------------------------------------------------------------------------------


def print_quality(title: str, rows: list[Quality]) -> None:
    """A method x (precision, recall per kind, overall recall, FP rate) table."""
    print(f"\n== {title} ==")
    header = f"{'method':<46} {'prec':>5} " + " ".join(f"{k[:11]:>11}" for k in KINDS)
    print(f"{header} {'recall':>6} {'FP rate':>7}")
    for row in rows:
        recalls = " ".join(f"{row.recall[k]:>11.3f}" for k in KINDS)
        print(
            f"{row.method:<46} {row.precision:>5.3f} {recalls} {row.overall_recall:>6.3f}"
            f" {row.false_positive_rate:>7.2%}"
        )


def print_costs(costs: list[Cost]) -> None:
    """p50/p95 microseconds per record, one record per call and 100 per call."""
    print("\n== Scoring cost, µs per record (anomaly.score: checks + one decision_function) ==")
    print(f"{'model':<9} {'1/call p50':>10} {'p95':>9} {'100/call p50':>13} {'p95':>9}", end="")
    print(f" {'bare decision_function, 1 row, p50':>35}")
    for cost in costs:
        print(
            f"{cost.algorithm:<9} {cost.single_p50_us:>10.1f} {cost.single_p95_us:>9.1f}"
            f" {cost.batch_p50_us:>13.1f} {cost.batch_p95_us:>9.1f}"
            f" {cost.raw_single_p50_us:>35.1f}"
        )


def target_verdict(default: Quality) -> tuple[bool, str]:
    """Whether the default model meets recall >= 0.9 on 5-sigma spikes with <= 2 % FP."""
    recall, fp = default.recall["5-sigma"], default.false_positive_rate
    met = recall >= RECALL_TARGET and fp <= FP_TARGET
    verdict = "met" if met else "MISSED"
    return met, (
        f"Target for the default ({anomaly.DEFAULT_ALGORITHM}, contamination "
        f"{anomaly.DEFAULT_CONTAMINATION}): recall >= {RECALL_TARGET} on 5-sigma spikes with <= "
        f"{FP_TARGET:.0%} false positives: recall {recall:.3f}, FP {fp:.2%}: {verdict}"
    )


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer records (<30 s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the stream (0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def main() -> int:
    """Generate, evaluate, time, print (and write JSON)."""
    args = parse_args()
    sizes = Sizes.quick() if args.quick else Sizes()
    started = time.perf_counter()
    stream = make_stream(args.seed, sizes)
    outliers = int((stream.labels != "normal").sum())
    print(
        f"eval_anomaly: seed {args.seed}, {'quick' if args.quick else 'full'}; python "
        f"{platform.python_version()}, pyod {metadata.version('pyod')}, scikit-learn "
        f"{metadata.version('scikit-learn')}, numpy {np.__version__}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"history {len(stream.history)} normal records; test stream {len(stream.test)} records: "
        f"{sizes.normal} normal, {outliers} outliers ({sizes.spikes_per_level} spikes per level, "
        f"{sizes.drift_runs} drift runs of {sizes.drift_length}, {sizes.combinations} combinations)"
    )
    print(f"pyod models: contamination {anomaly.DEFAULT_CONTAMINATION}, scored {BATCH} per call")

    rows = statistical_methods(stream)
    models: dict[str, anomaly.TrainedModel] = {}
    fit_seconds: dict[str, float] = {}
    for algorithm in anomaly.ALGORITHMS:
        fit_started = time.perf_counter()
        models[algorithm] = train(stream, algorithm, args.seed)
        fit_seconds[algorithm] = time.perf_counter() - fit_started
        is_default = algorithm == anomaly.DEFAULT_ALGORITHM
        label = f"{algorithm} (anomaly.train{', default' if is_default else ''})"
        rows.append(quality(label, model_flags(models[algorithm], stream.test), stream.labels))
        if is_default:
            default = rows[-1]
    print_quality("Detection quality (recall per outlier kind)", rows)
    fits = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in fit_seconds.items())
    print(f"training time: {fits} (hbos: the first fit in a process compiles numba)")
    met, verdict = target_verdict(default)
    print(verdict)

    tuning = hbos_settings(stream)
    print_quality("HBOS settings tried (contamination 0.01 unless c= says otherwise)", tuning)

    costs = [scoring_cost(models[a], stream, sizes.timing_seconds) for a in anomaly.ALGORITHMS]
    print_costs(costs)
    elapsed = time.perf_counter() - started
    print(f"\n{verdict}\n(run took {elapsed:.1f} s)")
    if args.json is not None:
        document = {
            "seed": args.seed,
            "quick": args.quick,
            "sizes": asdict(sizes),
            "contamination": anomaly.DEFAULT_CONTAMINATION,
            "quality": [asdict(row) for row in rows],
            "hbos_settings": [asdict(row) for row in tuning],
            "cost_us_per_record": [asdict(cost) for cost in costs],
            "fit_seconds": fit_seconds,
            "target": {"met": met, "verdict": verdict},
            "elapsed_seconds": elapsed,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
