"""`gateway anomaly train|list`: fit a stream's outlier model on its history, list the versions.

Training reads the stream's accepted records from the running upstream (its DuckDB, through
`GET /api/ingest/<stream>/features` with the gateway's secret), or from an NDJSON file with
--input. The model file is signed with the key validation.model_key refers to (made by
`gateway setup`); the running gateway picks a new version up within
validation.model_check_seconds, without a restart.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import aiohttp

from gateway import keys
from gateway.audit import record_offline, system_event
from gateway.validation import anomaly
from gateway.validation.streams import load_streams
from gateway.validation.upstream_api import UpstreamReader, UpstreamReadError

if TYPE_CHECKING:
    import argparse

    from gateway.config import GatewayConfig
    from gateway.validation.streams import ModelConfig


def register(sub: Any) -> None:
    """Add the `anomaly` command group to the gateway's parser."""
    group = sub.add_parser("anomaly", help="outlier models of ingest streams").add_subparsers(
        dest="what", required=True
    )
    train = group.add_parser("train", help="fit a stream's model on its history and save it")
    train.add_argument("--stream", required=True, help="a stream with [stream.model] config")
    train.add_argument(
        "--algorithm", choices=anomaly.ALGORITHMS, help="default: the stream's config"
    )
    train.add_argument("--contamination", type=float, help="default: the stream's config")
    train.add_argument("--input", type=Path, help="train on this NDJSON file of records instead")
    train.add_argument("--window-hours", type=int, help="history window (default: config)")
    train.add_argument("--max-records", type=int, help="newest records used (default: config)")
    train.set_defaults(func=cmd_anomaly_train)
    show = group.add_parser("list", help="every saved model version with its metadata")
    show.add_argument("--stream", help="only this stream")
    show.set_defaults(func=cmd_anomaly_list)


def cmd_anomaly_train(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Train, save (signed, versioned) and audit a stream's model; print its metadata."""
    catalog = load_streams(config.validation.streams_file, config.routes.schema_dir)
    spec = catalog.streams.get(args.stream)
    if spec is None or spec.model is None:
        _fail(f"stream {args.stream!r} has no [stream.model] in {config.validation.streams_file}")
    model_config = spec.model
    if args.input is not None:
        rows, skipped = _rows_from_file(args.input, model_config)
    else:
        rows, skipped = _rows_from_upstream(config, args, model_config), 0
    if len(rows) < model_config.min_samples:
        _fail(
            f"only {len(rows)} usable records for {args.stream!r} (every feature a number); "
            f"min_samples is {model_config.min_samples}"
        )
    model = anomaly.train(
        rows,
        stream=args.stream,
        features=model_config.names,
        algorithm=args.algorithm or model_config.algorithm,
        contamination=args.contamination or model_config.contamination,
    )
    key = _key(config)
    path = anomaly.save(model, config.validation.model_dir, key)
    meta = anomaly.read_meta(path, key)
    summary = {"path": str(path), "model": meta.model_id, "skipped_records": skipped,
               **_meta_dict(meta)}  # fmt: skip
    record_offline(
        config.audit.jsonl_path,
        config.audit.db_path,
        system_event(
            "anomaly.model_trained",
            subject=getpass.getuser(),
            stream=args.stream,
            model=meta.model_id,
            algorithm=meta.algorithm,
            samples=meta.samples,
            threshold=meta.threshold,
        ),
    )
    print(json.dumps(summary, indent=2))  # noqa: T201
    print("the running gateway uses it within validation.model_check_seconds")  # noqa: T201
    return 0


def cmd_anomaly_list(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Print every model version (verified) with its metadata, newest last."""
    directory = config.validation.model_dir
    streams = [args.stream] if args.stream else sorted(
        p.name for p in directory.iterdir() if p.is_dir()
    ) if directory.is_dir() else []  # fmt: skip
    key = _key(config) if streams else b""
    for stream in streams:
        for path in anomaly.versions(directory, stream):
            try:
                meta = _meta_dict(anomaly.read_meta(path, key))
            except anomaly.ModelError as exc:
                meta = {"error": str(exc)}
            print(json.dumps({"path": str(path), **meta}))  # noqa: T201
    return 0


def _key(config: GatewayConfig) -> bytes:
    key = keys.model_key(config)
    return anomaly.parse_key(key.secret.value, key.secret.source)


def _meta_dict(meta: anomaly.ModelMeta) -> dict[str, Any]:
    return json.loads(meta.canonical_json())  # type: ignore[no-any-return]


def _rows_from_file(path: Path, model: ModelConfig) -> tuple[list[list[float]], int]:
    """Feature rows of an NDJSON file of records; records missing a feature are skipped."""
    from gateway.stages.validate import parse_json  # noqa: PLC0415 - the CLI's only use of it

    rows: list[list[float]] = []
    skipped = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = parse_json(line)
            except ValueError as exc:
                _fail(f"{path}:{number}: not a JSON record: {exc}")
            row = [feature.get(record) for feature in model.features]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
                rows.append([float(v) for v in row])
            else:
                skipped += 1
    return rows, skipped


def _rows_from_upstream(
    config: GatewayConfig, args: argparse.Namespace, model: ModelConfig
) -> list[list[float]]:
    secret = keys.read_secret(config.upstream.secret_file)

    async def fetch() -> list[list[float]]:
        async with aiohttp.ClientSession() as session:
            reader = UpstreamReader(session, config.upstream.url, lambda: secret)
            return await reader.features(
                args.stream,
                model.names,
                args.window_hours or model.window_hours,
                args.max_records or model.max_records,
            )

    try:
        return asyncio.run(fetch())
    except UpstreamReadError as exc:
        _fail(f"cannot read the stream's history from the upstream: {exc}")


def _fail(message: str) -> NoReturn:
    print(f"gateway: {message}", file=sys.stderr)  # noqa: T201
    raise SystemExit(2)
