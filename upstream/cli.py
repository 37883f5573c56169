"""The ``python -m upstream`` command line: ``serve`` and ``db init|new|status``.

It turns setup problems into one ``upstream: error: ...`` line and exit status 1; it must
never print a traceback for a problem the operator can fix.
"""

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import duckdb

from empsecrets import providers
from empsecrets.fieldcrypt import DataKeyError, provision_ring, ring_exists
from upstream.config import UpstreamConfig, load_config, with_overrides
from upstream.errors import SecretError, SetupError
from upstream.migrations import (
    MIGRATIONS_DIR,
    apply_pending,
    create_migration,
    discover_migrations,
    plan_migrations,
)
from upstream.sealing import compact_database, count_sealed
from upstream.server import serve


def _say(message: str) -> None:
    print(message, flush=True)  # noqa: T201  # a command line speaks on stdout


def _config(args: argparse.Namespace) -> UpstreamConfig:
    config = load_config(args.config)
    return with_overrides(
        config,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        database_path=args.db,
        secret_file=getattr(args, "secret_file", None),
    )


def _connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as error:
        # DuckDB allows one process per file: usually the server is running on it.
        raise SetupError(f"cannot open database {path} (is the server running?): {error}") from None


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a stop signal."""
    config = _config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(config))
    return 0


def run_db_init(args: argparse.Namespace) -> int:
    """Apply pending migrations, creating the database file and its data key ring if needed."""
    config = _config(args)
    path = config.database.path
    migrations = discover_migrations()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _connect(path) as connection:
        applied = apply_pending(connection, migrations)
        sealed = count_sealed(connection)
    _provision_ring(config, sealed_values=sealed)
    for migration in applied:
        _say(f"applied {migration.label}")
    if not applied:
        _say(f"nothing to apply: {path} is up to date")
    else:
        _say(f"{path} is up to date ({len(applied)} migration(s) applied)")
    return 0


def _provision_ring(config: UpstreamConfig, *, sealed_values: int) -> None:
    reference, settings = config.encryption.data_keys, config.provider_settings
    try:
        if sealed_values and not ring_exists(reference, settings):
            # A new ring could open none of them: the old ring is lost or misnamed.
            raise SecretError(
                f"the database holds {sealed_values} sealed values but {reference} holds no"
                " data key ring; restore the keystore (or fix [encryption] data_keys)"
            )
        if provision_ring(reference, settings):
            _say(f"made the data key ring {reference}")
    except (providers.SecretError, DataKeyError) as error:
        raise SecretError(f"the data key ring {reference} cannot be used: {error}") from None


def run_db_compact(args: argparse.Namespace) -> int:
    """Rewrite the database into a fresh file, so no freed block keeps an old value.

    DuckDB reuses freed blocks but does not wipe them: after sealing rows written before
    encryption, or after a key rotation, the old plaintext or ciphertext stays in the file
    until this runs. The service must be stopped (DuckDB allows one process per file).
    """
    path = _config(args).database.path
    if not path.is_file():
        raise SetupError(f"database {path} does not exist")
    fresh = path.with_name(f"{path.name}.compact")
    fresh.unlink(missing_ok=True)
    with _connect(path):
        pass  # fails clearly while the server holds the file
    counts = compact_database(path, fresh)
    _say(f"compacted {path}: " + ", ".join(f"{table} {rows}" for table, rows in counts.items()))
    return 0


def run_db_new(args: argparse.Namespace) -> int:
    """Create the next numbered, empty migration file."""
    _say(str(create_migration(args.dir or MIGRATIONS_DIR, args.name)))
    return 0


def run_db_status(args: argparse.Namespace) -> int:
    """List applied and pending migrations; exit 1 if the history is broken."""
    path = _config(args).database.path
    migrations = discover_migrations()
    _say(f"database {path}")
    if not path.is_file():
        for migration in migrations:
            _say(f"pending  {migration.label}")
        return 0
    with _connect(path, read_only=True) as connection:
        plan = plan_migrations(connection, migrations)
    for row in plan.applied:
        _say(f"applied  {row.label}  {row.applied_at.isoformat()}Z")
    for migration in plan.pending:
        _say(f"pending  {migration.label}")
    for problem in plan.problems:
        _say(f"problem  {problem}")
    return 1 if plan.problems else 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config (default: config/upstream.toml)")
    parser.add_argument("--db", type=Path, help="DuckDB file, overriding [database] path")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each command's handler is its ``run`` default."""
    parser = argparse.ArgumentParser(prog="python -m upstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the EMP service (the default)")
    _add_config_options(serve_parser)
    serve_parser.add_argument("--host", help="listen address, overriding [server] host")
    serve_parser.add_argument("--port", type=int, help="listen port, overriding [server] port")
    serve_parser.add_argument("--secret-file", type=Path, help="overrides [trust] secret_file")
    serve_parser.set_defaults(run=run_serve)

    db_parser = commands.add_parser("db", help="manage the database schema")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    init_parser = db_commands.add_parser("init", help="apply pending migrations")
    _add_config_options(init_parser)
    init_parser.set_defaults(run=run_db_init)
    compact_parser = db_commands.add_parser(
        "compact", help="rewrite the file so freed blocks keep no old value (service stopped)"
    )
    _add_config_options(compact_parser)
    compact_parser.set_defaults(run=run_db_compact)
    status_parser = db_commands.add_parser("status", help="list applied and pending migrations")
    _add_config_options(status_parser)
    status_parser.set_defaults(run=run_db_status)
    new_parser = db_commands.add_parser("new", help="create the next numbered migration file")
    new_parser.add_argument("name", help="what the migration does, e.g. 'add ticket tags'")
    new_parser.add_argument(
        "--dir", type=Path, default=None, help=f"migrations folder (default: {MIGRATIONS_DIR})"
    )
    new_parser.set_defaults(run=run_db_new)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments or ["serve"])
    try:
        status: int = args.run(args)
    except SetupError as error:
        print(f"upstream: error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    return status
