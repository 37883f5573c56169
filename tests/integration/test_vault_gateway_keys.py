"""The gateway's own keys from Vault: `vault:` references in gateway.toml, `[secrets] vault_*`
settings, against a real OpenBao dev server (tests/support/vault_server.py), not a fake."""

from __future__ import annotations

from pathlib import Path

import hvac
import pytest
from support.vault_server import VaultDevServer, vault_dev_server

from empsecrets.providers import SecretError
from gateway import keys
from gateway.config import GatewayConfig, load_config
from gateway.identity.mfa import new_sealing_key
from gateway.secrets.inventory import inventory

READ_EMP_ONLY = 'path "secret/data/emp/*" { capabilities = ["read"] }'


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> VaultDevServer:
    with vault_dev_server(tmp_path_factory.mktemp("bao")) as server:
        yield server


def gateway_config(tmp_path: Path, vault: VaultDevServer, token: str) -> GatewayConfig:
    """The session key from Vault; the token in a 0600 file the config refers to."""
    token_file = tmp_path / "vault.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[identity]
db_path = "{tmp_path}/identity.duckdb"
[identity.sessions]
key = "vault:secret/emp/gateway#session"
[issuer]
key_dir = "{tmp_path}/keys"
[secrets]
keystore_file = "{tmp_path}/keystore.json"
master_key_file = "{tmp_path}/keystore.master"
vault_address = "{vault.address}"
vault_token = "file:{token_file}"
""")
    return load_config(path, env={})


def test_the_session_key_comes_from_vault_with_a_least_privilege_token(vault, tmp_path):
    """A token that may only read secret/data/emp/* opens the session key; `secrets check`
    lists it by reference with Vault's version and created_time."""
    root = hvac.Client(url=vault.address, token=vault.root_token)
    value = new_sealing_key()
    root.secrets.kv.v2.create_or_update_secret(path="emp/gateway", secret={"session": value})
    root.sys.create_or_update_policy(name="emp-gateway", policy=READ_EMP_ONLY)
    token = root.auth.token.create(policies=["emp-gateway"], ttl="10m")["auth"]["client_token"]
    config = gateway_config(tmp_path, vault, token)
    box = keys.session_box(config)
    assert box.open(box.seal(b"session-id", context="c"), context="c") == b"session-id"
    state = {s.name: s for s in inventory(config)}["session_key"]
    assert (state.status, state.source) == ("ok", "vault:secret/emp/gateway#session")
    assert state.note == "vault:secret/emp/gateway#session, version 1"
    assert state.age_seconds is not None
    assert 0 <= state.age_seconds < 600
    assert value not in repr(state)


def test_a_refused_vault_token_refuses_the_start_naming_the_setting(vault, tmp_path):
    """A token Vault refuses: the key does not resolve, the message names the setting and the
    address, never the token."""
    config = gateway_config(tmp_path, vault, "not-a-token-vault-knows")
    with pytest.raises(SecretError) as refused:
        keys.session_box(config)
    assert "identity.sessions.key (vault:secret/emp/gateway#session)" in str(refused.value)
    assert "403" in str(refused.value)
    assert "not-a-token-vault-knows" not in str(refused.value)
    state = {s.name: s for s in inventory(config)}["session_key"]
    assert (state.status, state.failing) == ("unreadable", True)
