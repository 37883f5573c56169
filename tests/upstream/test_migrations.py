"""Migrations: applied in order, recorded, idempotent, and refused when history changed."""

import shutil
from pathlib import Path

import duckdb
import pytest

from upstream import migrations as migrations_module
from upstream.cli import main
from upstream.errors import MigrationError
from upstream.migrations import (
    MIGRATIONS_DIR,
    apply_pending,
    create_migration,
    discover_migrations,
    ensure_current,
    plan_migrations,
    slugify,
)


def _next_label(slug: str) -> str:
    """The label ``db new`` gives the migration after the shipped ones."""
    return f"{discover_migrations()[-1].version + 1:04d}_{slug}"


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped migrations, safe to edit."""
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


@pytest.fixture
def connection(tmp_path: Path):
    with duckdb.connect(str(tmp_path / "m.duckdb")) as connection:
        yield connection


def test_initial_migration_creates_every_table(db_path: Path) -> None:
    """``db init`` creates the resource tables, the ingest table and their sequences."""
    with duckdb.connect(str(db_path), read_only=True) as connection:
        tables = {
            row[0]
            for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        }
        sequences = {
            row[0]
            for row in connection.execute("SELECT sequence_name FROM duckdb_sequences()").fetchall()
        }
    assert {"departments", "employees", "tickets", "ingest_records"} <= tables
    assert {"departments_id_seq", "employees_id_seq", "tickets_id_seq"} <= sequences


def test_ingest_quality_migration_adds_scores_and_the_quarantine(db_path: Path) -> None:
    """0002 adds score/model to ingest_records and the ingest_quarantine table with defaults."""
    with duckdb.connect(str(db_path)) as connection:
        columns = {
            row[0]: row[1]
            for row in connection.execute(
                "SELECT column_name, data_type FROM duckdb_columns()"
                " WHERE table_name = 'ingest_records'"
            ).fetchall()
        }
        connection.execute(
            "INSERT INTO ingest_quarantine (stream, batch_id, record_index, record, flags)"
            " VALUES ('s', uuid(), 0, '{}', '[]')"
        )
        row = connection.execute(
            "SELECT id, status, received_at IS NOT NULL, reviewed_at FROM ingest_quarantine"
        ).fetchone()
    assert (columns["score"], columns["model"]) == ("DOUBLE", "VARCHAR")
    assert row == (1, "pending", True, None)


def test_applied_versions_are_recorded_with_name_and_checksum(db_path: Path) -> None:
    """Each applied file leaves a schema_migrations row matching the file on disk."""
    shipped = discover_migrations()
    with duckdb.connect(str(db_path), read_only=True) as connection:
        rows = connection.execute(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (migration.version, migration.name, migration.checksum) for migration in shipped
    ]
    assert [row[1] for row in rows][:2] == ["initial", "ingest_quality"]
    assert all(row[3] is not None for row in rows)


def test_second_init_applies_nothing_and_says_so(db_path: Path, capsys) -> None:
    """Running ``db init`` again is a no-op that reports the database is up to date."""
    capsys.readouterr()
    assert main(["db", "init", "--db", str(db_path)]) == 0
    assert "nothing to apply" in capsys.readouterr().out


def test_pending_migrations_apply_in_version_order(connection, migrations_dir: Path) -> None:
    """Later files apply after earlier ones, each recorded under its own version."""
    (migrations_dir / "9999_third.sql").write_text("CREATE TABLE third (id INTEGER);")
    (migrations_dir / "9998_second.sql").write_text("CREATE TABLE second (id INTEGER);")
    applied = apply_pending(connection, discover_migrations(migrations_dir))
    shipped = [m.label for m in discover_migrations()]
    assert [m.label for m in applied] == [*shipped, "9998_second", "9999_third"]
    assert apply_pending(connection, discover_migrations(migrations_dir)) == []


def test_changed_applied_file_is_refused(connection, migrations_dir: Path) -> None:
    """Editing an applied migration makes further migration refuse with a checksum message."""
    apply_pending(connection, discover_migrations(migrations_dir))
    with (migrations_dir / "0001_initial.sql").open("a") as initial:
        initial.write("\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"0001_initial\.sql was changed"):
        apply_pending(connection, discover_migrations(migrations_dir))


def test_missing_applied_file_is_refused(connection, migrations_dir: Path) -> None:
    """Deleting an applied migration's file makes further migration refuse."""
    (migrations_dir / "9999_extra.sql").write_text("CREATE TABLE extra (id INTEGER);")
    apply_pending(connection, discover_migrations(migrations_dir))
    (migrations_dir / "9999_extra.sql").unlink()
    with pytest.raises(
        MigrationError, match=r"9999_extra\.sql was applied but its file is missing"
    ):
        apply_pending(connection, discover_migrations(migrations_dir))


def test_cli_init_exits_non_zero_on_changed_file(
    tmp_path: Path, migrations_dir: Path, monkeypatch, capsys
) -> None:
    """``db init`` prints a clear error and exits 1 when an applied file changed."""
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", migrations_dir)
    db = str(tmp_path / "cli.duckdb")
    assert main(["db", "init", "--db", db]) == 0
    (migrations_dir / "0001_initial.sql").write_text("-- rewritten\n")
    assert main(["db", "init", "--db", db]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_failing_migration_is_rolled_back(connection, migrations_dir: Path) -> None:
    """A migration that fails leaves neither its tables nor a ledger row behind."""
    (migrations_dir / "9999_broken.sql").write_text(
        "CREATE TABLE half (id INTEGER);\nINSERT INTO no_such_table VALUES (1);"
    )
    with pytest.raises(MigrationError, match=r"9999_broken\.sql failed"):
        apply_pending(connection, discover_migrations(migrations_dir))
    plan = plan_migrations(connection, discover_migrations(migrations_dir))
    assert [m.label for m in plan.pending] == ["9999_broken"]
    tables = {
        row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()
    }
    assert "half" not in tables


def test_misnamed_sql_file_is_refused(migrations_dir: Path) -> None:
    """A .sql file that is not NNNN_name.sql is an error, never silently skipped."""
    (migrations_dir / "2_oops.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"2_oops\.sql is not named"):
        discover_migrations(migrations_dir)


def test_ensure_current_refuses_pending_migrations(connection) -> None:
    """A database behind the files is refused with the command that fixes it."""
    with pytest.raises(MigrationError, match="python -m upstream db init"):
        ensure_current(connection, discover_migrations())


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        pytest.param("add ticket tags", "add_ticket_tags", id="spaces"),
        pytest.param("Add-Ticket  Tags!", "add_ticket_tags", id="case and punctuation"),
        pytest.param("v2 index", "v2_index", id="digits kept"),
    ],
)
def test_migration_names_are_slugified(name: str, slug: str) -> None:
    """Free-text names become [a-z0-9_] file names."""
    assert slugify(name) == slug


def test_db_new_numbers_after_the_highest_file(tmp_path: Path, capsys) -> None:
    """``db new`` writes the next NNNN file with a header comment and prints its path."""
    directory = tmp_path / "migrations"
    directory.mkdir()
    (directory / "0001_initial.sql").write_text("")
    (directory / "0007_later.sql").write_text("")
    assert main(["db", "new", "Add Ticket Tags", "--dir", str(directory)]) == 0
    created = directory / "0008_add_ticket_tags.sql"
    assert capsys.readouterr().out.strip() == str(created)
    assert created.read_text().startswith("-- 0008_add_ticket_tags: Add Ticket Tags\n")


def test_db_new_starts_at_0001(tmp_path: Path) -> None:
    """The first migration of an empty folder is 0001."""
    assert create_migration(tmp_path, "initial").name == "0001_initial.sql"


def test_db_new_refuses_a_name_without_letters(tmp_path: Path) -> None:
    """A name that slugifies to nothing is refused."""
    assert main(["db", "new", "!!!", "--dir", str(tmp_path)]) == 1


def test_new_empty_migration_applies(connection, migrations_dir: Path) -> None:
    """A freshly created, comment-only migration applies cleanly."""
    create_migration(migrations_dir, "nothing yet")
    applied = apply_pending(connection, discover_migrations(migrations_dir))
    assert applied[-1].label == _next_label("nothing_yet")


def test_db_status_lists_applied_and_pending(
    tmp_path: Path, migrations_dir: Path, monkeypatch, capsys
) -> None:
    """``db status`` shows each migration as applied or pending."""
    monkeypatch.setattr(migrations_module, "MIGRATIONS_DIR", migrations_dir)
    db = str(tmp_path / "status.duckdb")
    assert main(["db", "init", "--db", db]) == 0
    expected = f"pending  {_next_label('next_step')}"
    create_migration(migrations_dir, "next step")
    capsys.readouterr()
    assert main(["db", "status", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("applied  0001_initial") for line in lines)
    assert any(line.startswith("applied  0002_ingest_quality") for line in lines)
    assert expected in lines
