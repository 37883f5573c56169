"""Configuration: frozen, typed, unknown keys and bad values stop the start with the key named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from support.stack import REPO

from gateway.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads_and_is_frozen():
    """config/gateway.toml is valid, and the result cannot be changed at run time."""
    config = load_config(REPO / "config" / "gateway.toml", env={})
    assert config.server.https_port == 8443
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.https_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[server]\nhttps_prot = 1\n", "server.https_prot"),
        ("[nonsense]\n", "nonsense"),
        ('[server]\nhttps_port = "8443"\n', "server.https_port"),
        ('[server]\nenvironment = "staging"\n', "server.environment"),
        ('[authn]\nallowed_algorithms = ["HS256"]\n', "authn.allowed_algorithms"),
        ('[authn]\nallowed_algorithms = ["none"]\n', "authn.allowed_algorithms"),
        ('[[authn.issuers]]\nissuer = "x"\njwks_uri = "https://x"\n', "authn.issuers[0].audiences"),
        (
            (
                '[[authn.issuers]]\nissuer = "https://x"\njwks_uri = "http://idp.example"\n'
                'audiences = ["a"]\n'
            ),
            "authn.issuers[0].jwks_uri",
        ),
        ("[server]\nhttps_port = 9464\n", "must differ"),
        ("[limits]\nmax_body_bytes = 0\n", "limits.max_body_bytes"),
        ('[identity]\nstate_url = "memcached://x"\n', "identity.state_url"),
        (
            '[[authn.issuers]]\nissuer = "http://idp.example"\naudiences = ["a"]\n',
            "authn.issuers[0].issuer",
        ),
        (
            '[[authn.issuers]]\nissuer = "https://x"\naudiences = ["a"]\nrole_map = ["admin"]\n',
            "role_map",
        ),
        ('[identity.sessions]\ncookie_name = "emp"\n', "__Host-"),
        ("not toml at all = = =", "not valid TOML"),
    ],
    ids=[
        "typo",
        "unknown_section",
        "wrong_type",
        "bad_literal",
        "symmetric_alg",
        "alg_none",
        "issuer_without_audience",
        "plain_http_jwks",
        "port_clash",
        "zero_body_limit",
        "state_url_scheme",
        "plain_http_issuer",
        "role_map_without_equals",
        "cookie_without_host_prefix",
        "bad_toml",
    ],
)
def test_bad_config_names_the_key(tmp_path, text, named):
    """Each mistake is refused, and the message says which key to fix."""
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), env={})


def test_environment_overrides_a_key(tmp_path):
    """GATEWAY__SECTION__KEY overrides the file, parsed as a TOML value."""
    config = load_config(
        write(tmp_path, ""),
        env={"GATEWAY__SERVER__HTTPS_PORT": "9443", "GATEWAY__LOGGING__FORMAT": "console"},
    )
    assert config.server.https_port == 9443
    assert config.logging.format == "console"


def test_environment_override_is_validated_too(tmp_path):
    """A typo in an override is as fatal as one in the file."""
    with pytest.raises(ConfigError, match=r"server\.https_prot"):
        load_config(write(tmp_path, ""), env={"GATEWAY__SERVER__HTTPS_PROT": "1"})


def test_missing_file_is_refused(tmp_path):
    """No config file, no start."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", env={})
