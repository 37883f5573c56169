"""Config loading: defaults, overrides, and refusals that name the key."""

from pathlib import Path

import pytest

from upstream.config import UpstreamConfig, load_config, parse_config, with_overrides
from upstream.errors import ConfigError

REPO_CONFIG = Path(__file__).parents[2] / "config" / "upstream.toml"


def test_repository_config_matches_the_defaults(monkeypatch) -> None:
    """The shipped config/upstream.toml parses and says exactly what the defaults say."""
    monkeypatch.chdir(REPO_CONFIG.parents[1])
    assert load_config(REPO_CONFIG) == UpstreamConfig()


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch) -> None:
    """A relative database path is anchored at the cwd when the file is loaded."""
    monkeypatch.chdir(tmp_path)
    config = parse_config({"database": {"path": "data/x.duckdb"}}, "test.toml")
    assert config.database.path == tmp_path / "data" / "x.duckdb"


@pytest.mark.parametrize(
    ("document", "named"),
    [
        pytest.param({"server": {"hots": "x"}}, "server.hots", id="unknown key"),
        pytest.param({"servers": {}}, "[servers]", id="unknown section"),
        pytest.param({"server": {"port": "8081"}}, "server.port", id="port as string"),
        pytest.param({"server": {"port": True}}, "server.port", id="port as bool"),
        pytest.param({"server": {"port": 70000}}, "server.port", id="port out of range"),
        pytest.param({"database": {"path": ""}}, "database.path", id="empty path"),
        pytest.param({"trust": "x"}, "[trust]", id="section not a table"),
    ],
)
def test_bad_config_is_refused_naming_the_key(document, named) -> None:
    """Unknown or ill-typed settings stop the load with the key in the message."""
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_config(document, "test.toml")


def test_missing_explicit_config_file_is_refused(tmp_path) -> None:
    """Asking for a config file that does not exist is an error, not silent defaults."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_flags_override_the_file(tmp_path) -> None:
    """Command-line values win over the file's."""
    config = with_overrides(UpstreamConfig(), host="0.0.0.0", port=9000, database_path=tmp_path)
    assert (config.server.host, config.server.port, config.database.path) == (
        "0.0.0.0",
        9000,
        tmp_path,
    )
