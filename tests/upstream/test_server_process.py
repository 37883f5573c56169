"""The real ``python -m upstream serve`` process: it serves, and it refuses bad setups."""

import json
import signal
import subprocess
from pathlib import Path
from urllib.request import Request, urlopen

import duckdb
import pytest

from upstream.testing import upstream_command


def test_served_process_answers_the_gateway(served, secret: str) -> None:
    """A real server process creates a ticket for a caller holding the secret."""
    request = Request(  # noqa: S310  # our own http URL
        f"{served.url}/api/tickets",
        data=json.dumps({"title": "from a real socket"}).encode(),
        headers={
            "Content-Type": "application/json",
            "X-Gateway-Secret": secret,
            "X-Gateway-Subject": "carol",
        },
        method="POST",
    )
    with urlopen(request, timeout=5) as response:  # noqa: S310  # our own http URL
        assert response.status == 201
        assert json.load(response)["created_by"] == "carol"
    assert "upstream listening on http://127.0.0.1:" in served.log.read_text()


def test_served_process_stops_cleanly_on_sigterm(served) -> None:
    """SIGTERM ends the server with exit status 0."""
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=10) == 0


def _serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        upstream_command("serve", *args), capture_output=True, text=True, timeout=30, check=False
    )


def test_server_refuses_to_start_without_a_secret_file(config_file: Path, tmp_path) -> None:
    """A missing secret file stops the start, naming the file."""
    missing = tmp_path / "no.secret"
    result = _serve_once("--config", str(config_file), "--secret-file", str(missing))
    assert result.returncode == 1
    assert f"secret file {missing} does not exist" in result.stderr


def test_server_refuses_to_start_with_an_empty_secret_file(config_file: Path, tmp_path) -> None:
    """A blank secret file stops the start."""
    empty = tmp_path / "empty.secret"
    empty.write_text("  \n")
    result = _serve_once("--config", str(config_file), "--secret-file", str(empty))
    assert result.returncode == 1
    assert "is empty" in result.stderr


@pytest.mark.parametrize("prepare", ["absent", "unmigrated"])
def test_server_refuses_to_start_with_pending_migrations(
    config_file: Path, tmp_path, prepare: str
) -> None:
    """A missing or unmigrated database stops the start and says to run db init."""
    db = tmp_path / f"{prepare}.duckdb"
    if prepare == "unmigrated":
        duckdb.connect(str(db)).close()
    result = _serve_once("--config", str(config_file), "--db", str(db))
    assert result.returncode == 1
    assert "python -m upstream db init" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_config_key_stops_the_start(tmp_path) -> None:
    """A typo in the config file is named in the error."""
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nhots = "x"\n')
    result = _serve_once("--config", str(config))
    assert result.returncode == 1
    assert "unknown key server.hots" in result.stderr


def test_db_commands_explain_a_database_locked_by_the_server(served, config_file: Path) -> None:
    """While the server holds the DuckDB file, ``db status`` says so instead of crashing."""
    result = subprocess.run(
        upstream_command("db", "status", "--config", str(config_file)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "is the server running?" in result.stderr
