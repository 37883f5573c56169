"""Applies the numbered SQL files in ``upstream/migrations/`` to a DuckDB database.

It must never run a migration twice, nor proceed when an applied file has changed or
gone missing: history is append-only.
"""

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from upstream.errors import MigrationError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILENAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_NOT_SLUG = re.compile(r"[^a-z0-9]+")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       VARCHAR NOT NULL,
    checksum   VARCHAR NOT NULL,
    applied_at TIMESTAMP NOT NULL
)
"""
_RECORD_APPLIED = """
INSERT INTO schema_migrations (version, name, checksum, applied_at)
VALUES (?, ?, ?, CAST(now() AT TIME ZONE 'UTC' AS TIMESTAMP))
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file as found on disk."""

    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def label(self) -> str:
        """The file's stem, e.g. ``0001_initial``."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """One row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime

    @property
    def label(self) -> str:
        """The applied file's stem, e.g. ``0001_initial``."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What is applied, what is pending, and what is wrong with the history."""

    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]
    problems: tuple[str, ...]


def discover_migrations(directory: Path | None = None) -> list[Migration]:
    """Read every ``NNNN_name.sql`` in version order; a misnamed .sql file is an error."""
    migrations: dict[int, Migration] = {}
    for path in sorted((directory or MIGRATIONS_DIR).glob("*.sql")):
        match = _FILENAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path} is not named NNNN_name.sql (lowercase, digits, _)")
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(f"{path} reuses version {version:04d}")
        content = path.read_bytes()
        migrations[version] = Migration(
            version=version,
            name=match["name"],
            path=path,
            sql=content.decode("utf-8"),
            checksum=hashlib.sha256(content).hexdigest(),
        )
    return [migrations[version] for version in sorted(migrations)]


def _read_applied(connection: duckdb.DuckDBPyConnection) -> list[AppliedMigration]:
    ledger_exists = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_migrations'"
    ).fetchone()
    if ledger_exists is None or ledger_exists[0] == 0:
        return []
    rows = connection.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def plan_migrations(
    connection: duckdb.DuckDBPyConnection, migrations: list[Migration]
) -> MigrationPlan:
    """Compare the ledger with the files, without changing the database."""
    applied = _read_applied(connection)
    on_disk = {migration.version: migration for migration in migrations}
    problems: list[str] = []
    for row in applied:
        migration = on_disk.get(row.version)
        if migration is None:
            problems.append(f"{row.label}.sql was applied but its file is missing")
        elif migration.checksum != row.checksum:
            problems.append(
                f"{migration.path.name} was changed after it was applied (checksum mismatch);"
                " restore it and put the change in a new migration"
            )
    applied_versions = {row.version for row in applied}
    pending = tuple(m for m in migrations if m.version not in applied_versions)
    return MigrationPlan(applied=tuple(applied), pending=pending, problems=tuple(problems))


def _apply_one(connection: duckdb.DuckDBPyConnection, migration: Migration) -> None:
    connection.begin()
    try:
        connection.execute(migration.sql)
        connection.execute(_RECORD_APPLIED, [migration.version, migration.name, migration.checksum])
        connection.commit()
    except duckdb.Error as error:
        connection.rollback()
        raise MigrationError(f"{migration.path.name} failed and was rolled back: {error}") from None


def apply_pending(
    connection: duckdb.DuckDBPyConnection, migrations: list[Migration]
) -> list[Migration]:
    """Apply each pending migration in its own transaction; return what was applied."""
    connection.execute(_CREATE_LEDGER)
    plan = plan_migrations(connection, migrations)
    if plan.problems:
        raise MigrationError("refusing to migrate: " + "; ".join(plan.problems))
    for migration in plan.pending:
        _apply_one(connection, migration)
    return list(plan.pending)


def ensure_current(connection: duckdb.DuckDBPyConnection, migrations: list[Migration]) -> None:
    """Refuse a database whose schema is behind, or whose history disagrees with the files."""
    plan = plan_migrations(connection, migrations)
    if plan.problems:
        raise MigrationError("database schema history is broken: " + "; ".join(plan.problems))
    if plan.pending:
        labels = ", ".join(migration.label for migration in plan.pending)
        raise MigrationError(
            f"database has pending migrations ({labels}); run `python -m upstream db init`"
        )


def slugify(name: str) -> str:
    """Reduce a free-text migration name to ``[a-z0-9_]``."""
    return _NOT_SLUG.sub("_", name.lower()).strip("_")


def create_migration(directory: Path, name: str) -> Path:
    """Write the next numbered, empty migration file and return its path."""
    slug = slugify(name)
    if not slug:
        raise MigrationError(f"migration name {name!r} has no letters or digits")
    versions = [
        int(match["version"])
        for path in directory.glob("*.sql")
        if (match := _FILENAME.match(path.name))
    ]
    version = max(versions, default=0) + 1
    path = directory / f"{version:04d}_{slug}.sql"
    header = (
        f"-- {path.stem}: {name}\n"
        "-- Applied once, in a transaction, by `python -m upstream db init`.\n"
        "-- Never edit this file once applied anywhere: add a new numbered migration instead.\n"
    )
    directory.mkdir(parents=True, exist_ok=True)
    with path.open("x", encoding="utf-8") as migration_file:
        migration_file.write(header)
    return path
