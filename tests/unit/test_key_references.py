"""The gateway's own keys by secret reference: config parsing, resolution that fails closed,
`env:` read once, the model key read again at each load, provisioning by `gateway setup`, and
`gateway secrets check` listing each key by its reference with its provider's date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from empsecrets.providers import Keystore, SecretError, SecretNotFoundError
from gateway import keys
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.identity.mfa import new_sealing_key
from gateway.secrets.inventory import DAY, inventory, render
from gateway.validation import anomaly

PASTED = "c2VjcmV0LXBhc3RlZC13aGVyZS1hLXJlZmVyZW5jZS1iZWxvbmdz"  # a secret, not a reference
GARBLED = "not base64: a value that is no key"
SETTINGS = ("identity.sessions.key", "identity.mfa.secret_key", "audit.checkpoint_key",
            "validation.model_key")  # fmt: skip


def config_with(tmp_path: Path, text: str = "", *, secrets: str = "") -> GatewayConfig:
    """A config whose files all live in tmp_path; `text` adds tables, `secrets` [secrets] keys."""
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
[tls]
cert_file = "{tmp_path}/certs/server.pem"
ca_file = "{tmp_path}/certs/ca.pem"
[issuer]
key_dir = "{tmp_path}/keys"
[identity]
db_path = "{tmp_path}/identity.duckdb"
[secrets]
keystore_file = "{tmp_path}/secrets/keystore.json"
master_key_file = "{tmp_path}/secrets/keystore.master"
{secrets}
{text}
""")
    return load_config(path, env={})


def provision_all(config: GatewayConfig) -> list[str | None]:
    return [keys.provision_key(key, config.secrets) for key in keys.gateway_keys(config)]


def stored(config: GatewayConfig, name: str) -> str:
    secrets = config.secrets
    return Keystore.open(secrets.keystore_file, secrets.master_key_file).get(name).value


# --- config --------------------------------------------------------------------------------


def test_each_key_defaults_to_its_keystore_entry(tmp_path):
    """With no key setting, the four keys come from the encrypted keystore (the default)."""
    config = config_with(tmp_path)
    assert config.identity.sessions.key_reference == "keystore:session-key"
    assert config.identity.mfa.secret_key_reference == "keystore:totp-key"
    assert config.audit.checkpoint_key_reference == "keystore:audit-checkpoint-key"
    assert config.validation.model_key_reference == "keystore:model-key"
    assert GatewayConfig().identity.sessions.key_reference == "keystore:session-key"


def test_a_key_file_setting_still_works_as_a_file_reference(tmp_path):
    """The older *_file settings keep working: a path is a file: reference."""
    config = config_with(tmp_path, """
[identity.sessions]
key_file = "var/secrets/session.key"
[identity.mfa]
secret_key_file = "/etc/emp/totp.key"
[audit]
checkpoint_key_file = "var/secrets/audit-checkpoint.key"
[validation]
model_key_file = "var/secrets/model.key"
""")  # fmt: skip
    assert config.identity.sessions.key_reference == "file:var/secrets/session.key"
    assert config.identity.mfa.secret_key_reference == "file:/etc/emp/totp.key"
    assert config.audit.checkpoint_key_reference == "file:var/secrets/audit-checkpoint.key"
    assert config.validation.model_key_reference == "file:var/secrets/model.key"


@pytest.mark.parametrize(
    ("text", "secrets", "reference"),
    [
        ('[identity.sessions]\nkey = "keystore:cookie-key-2"\n', "", "keystore:cookie-key-2"),
        (
            '[identity.sessions]\nkey = "file:/run/secrets/session"\n',
            "",
            "file:/run/secrets/session",
        ),
        ('[identity.sessions]\nkey = "env:EMP_SESSION_KEY"\n', "", "env:EMP_SESSION_KEY"),
        (
            '[identity.sessions]\nkey = "vault:secret/emp/gateway#session"\n',
            'vault_address = "https://vault.example:8200"\nvault_token = "file:vault.token"\n',
            "vault:secret/emp/gateway#session",
        ),
    ],
    ids=["keystore", "file", "env", "vault with a Vault configured"],
)
def test_a_key_setting_takes_any_provider_s_reference(tmp_path, text, secrets, reference):
    """A key setting holds a reference of any scheme; it is kept as written."""
    config = config_with(tmp_path, text, secrets=secrets)
    assert config.identity.sessions.key_reference == reference


@pytest.mark.parametrize(
    ("text", "secrets", "named"),
    [
        ('[identity.sessions]\nkey = "keystore:a"\nkey_file = "b"\n', "", "identity.sessions.key and identity.sessions.key_file are both set"),
        ('[identity.mfa]\nsecret_key = "keystore:a"\nsecret_key_file = "b"\n', "", "identity.mfa.secret_key and identity.mfa.secret_key_file"),
        ('[audit]\ncheckpoint_key = "keystore:a"\ncheckpoint_key_file = "b"\n', "", "audit.checkpoint_key and audit.checkpoint_key_file"),
        ('[validation]\nmodel_key = "keystore:a"\nmodel_key_file = "b"\n', "", "validation.model_key and validation.model_key_file"),
        (f'[identity.sessions]\nkey = "{PASTED}"\n', "", "identity.sessions.key: not a secret reference"),
        (f'[identity.mfa]\nsecret_key = "plain:{PASTED}"\n', "", "identity.mfa.secret_key: not a secret reference"),
        ('[audit]\ncheckpoint_key = "keystore:../escape"\n', "", "audit.checkpoint_key: malformed secret reference"),
        ('[validation]\nmodel_key = ""\n', "", "validation.model_key: not a secret reference"),
        ('[validation]\nmodel_key = "vault:secret/emp#model"\n', "", "validation.model_key: a vault: reference needs secrets.vault_address"),
        ("", 'vault_address = "https://vault.example:8200"\n', "secrets.vault_address and secrets.vault_token go together"),
        ("", 'vault_address = "https://v.example"\nvault_token = "vault:secret/t#token"\n', "secrets.vault_token: the Vault token cannot come from Vault"),
    ],
    ids=["session both", "totp both", "checkpoint both", "model both", "a pasted secret",
         "unknown scheme", "bad keystore name", "empty", "vault without a Vault",
         "vault address without token", "vault token from vault"],
)  # fmt: skip
def test_a_bad_key_setting_stops_the_start_naming_it_never_echoing_it(
    tmp_path, text, secrets, named
):
    """Both spellings at once, a malformed reference, or vault: with no Vault is a ConfigError
    naming the setting; a secret pasted where a reference belongs is never repeated."""
    with pytest.raises(ConfigError) as refused:
        config_with(tmp_path, text, secrets=secrets)
    assert named in str(refused.value)
    assert PASTED not in str(refused.value)


def test_a_key_reference_can_come_from_the_environment_override(tmp_path):
    """GATEWAY__IDENTITY__SESSIONS__KEY sets a reference like any other key (and is checked)."""
    path = tmp_path / "gateway.toml"
    path.write_text("")
    config = load_config(path, env={"GATEWAY__IDENTITY__SESSIONS__KEY": "keystore:other"})
    assert config.identity.sessions.key_reference == "keystore:other"
    with pytest.raises(ConfigError, match=r"identity\.sessions\.key") as refused:
        load_config(path, env={"GATEWAY__IDENTITY__SESSIONS__KEY": PASTED})
    assert PASTED not in str(refused.value)


# --- resolution ----------------------------------------------------------------------------


def test_the_four_keys_resolve_from_the_keystore_setup_filled(tmp_path):
    """After provisioning, each key opens in the form its reader expects."""
    config = config_with(tmp_path)
    provision_all(config)
    sealed = keys.session_box(config).seal(b"session-id", context="cookie")
    assert keys.session_box(config).open(sealed, context="cookie") == b"session-id"
    assert keys.totp_box(config).open(
        keys.totp_box(config).seal(b"JBSWY3DP", context="totp:alice"), context="totp:alice"
    ) == b"JBSWY3DP"  # fmt: skip
    assert isinstance(keys.checkpoint_key(config), Ed25519PrivateKey)
    model_key = keys.model_key(config)
    assert anomaly.read_key(model_key) == bytes.fromhex(stored(config, "model-key"))


def _missing_entry(config: GatewayConfig) -> None:
    secrets = config.secrets
    Keystore.open(secrets.keystore_file, secrets.master_key_file).delete("session-key")


def _no_keystore(config: GatewayConfig) -> None:
    config.secrets.keystore_file.unlink()


def _other_master(config: GatewayConfig) -> None:
    config.secrets.master_key_file.write_bytes(os.urandom(32))


def _garbled_value(config: GatewayConfig) -> None:
    secrets = config.secrets
    Keystore.open(secrets.keystore_file, secrets.master_key_file).put("session-key", GARBLED)


@pytest.mark.parametrize(
    ("break_it", "error", "message"),
    [
        (_missing_entry, SecretNotFoundError, "no secret named 'session-key'"),
        (_no_keystore, SecretError, "no keystore"),
        (_other_master, SecretError, "does not open"),
        (_garbled_value, ValueError, "sealing key is not base64 text"),
    ],
    ids=["entry missing", "no keystore", "another master key", "not a key"],
)
def test_an_unresolvable_key_refuses_naming_the_setting_never_a_value(
    tmp_path, break_it, error, message
):
    """A missing or unusable key raises (the gateway does not start) with the setting and
    reference named; neither the value nor any other key appears."""
    config = config_with(tmp_path)
    provision_all(config)
    values = [stored(config, name) for name in ("session-key", "totp-key", "model-key")]
    break_it(config)
    with pytest.raises(error) as refused:
        keys.session_box(config)
    text = str(refused.value)
    assert "identity.sessions.key" in text
    assert message in text
    for value in [*values, GARBLED]:
        assert value not in text


def test_an_insecure_key_file_is_refused_at_start(tmp_path):
    """file: keeps its checks: a key file others can read refuses the start, with the fix."""
    config = config_with(tmp_path, f'[identity.sessions]\nkey = "file:{tmp_path}/session.key"\n')
    (tmp_path / "session.key").write_text(new_sealing_key() + "\n")
    (tmp_path / "session.key").chmod(0o644)
    with pytest.raises(SecretError, match=r"identity.sessions.key .*mode 0644.*chmod 600"):
        keys.session_box(config)


def test_an_env_reference_is_read_once_and_leaves_the_environment(tmp_path, monkeypatch):
    """env: reads the variable and deletes it: os.environ and a later child process no longer
    show it; a second read in the same process finds nothing."""
    value = new_sealing_key()
    monkeypatch.setenv("EMP_TEST_SESSION_KEY", value)
    config = config_with(tmp_path, '[identity.sessions]\nkey = "env:EMP_TEST_SESSION_KEY"\n')
    box = keys.session_box(config)
    assert box.open(box.seal(b"x", context="c"), context="c") == b"x"
    assert "EMP_TEST_SESSION_KEY" not in os.environ
    assert value not in json.dumps(dict(os.environ))
    child = subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert value not in child.stdout
    assert "EMP_TEST_SESSION_KEY" not in json.loads(child.stdout)
    with pytest.raises(SecretNotFoundError, match="already read"):
        keys.session_box(config)


def test_an_env_model_key_keeps_its_start_value_on_reload(tmp_path, monkeypatch):
    """The model key is read again at each model load, but env: can be read only once: the
    value read at start serves every load."""
    value = anomaly.new_key()
    monkeypatch.setenv("EMP_TEST_MODEL_KEY", value)
    config = config_with(tmp_path, '[validation]\nmodel_key = "env:EMP_TEST_MODEL_KEY"\n')
    model_key = keys.model_key(config)
    assert anomaly.read_key(model_key) == anomaly.read_key(model_key) == bytes.fromhex(value)


def test_the_model_key_is_read_again_at_each_model_load(tmp_path):
    """A new keystore version serves the next load without a restart; a key that went missing
    is a ModelError (the stream's model is refused), not a crash."""
    config = config_with(tmp_path)
    provision_all(config)
    model_key = keys.model_key(config)
    first = anomaly.read_key(model_key)
    secrets = config.secrets
    keystore = Keystore.open(secrets.keystore_file, secrets.master_key_file)
    keystore.put("model-key", anomaly.new_key())
    second = anomaly.read_key(model_key)
    assert second != first
    assert second == bytes.fromhex(stored(config, "model-key"))
    keystore.delete("model-key")
    with pytest.raises(anomaly.ModelError, match=r"validation\.model_key"):
        anomaly.read_key(model_key)


# --- provisioning (`gateway setup`) --------------------------------------------------------


def test_setup_puts_each_missing_key_in_the_keystore_once(tmp_path):
    """The first run writes version 1 of each key; later runs change nothing; --force makes
    new session and TOTP keys but keeps the checkpoint and model keys (saved models and
    signed checkpoints depend on them)."""
    config = config_with(tmp_path)
    done = provision_all(config)
    assert [line.split(" (")[0] for line in done if line] == [
        "wrote keystore:session-key", "wrote keystore:totp-key",
        "wrote keystore:audit-checkpoint-key", "wrote keystore:model-key",
    ]  # fmt: skip
    assert provision_all(config) == [None] * 4
    for key in keys.gateway_keys(config):
        keys.provision_key(key, config.secrets, force=True)
    secrets = config.secrets
    versions = {
        entry.name: entry.version
        for entry in Keystore.open(secrets.keystore_file, secrets.master_key_file).list()
    }
    assert versions == {"session-key": 2, "totp-key": 2, "audit-checkpoint-key": 1, "model-key": 1}
    assert stat_mode(secrets.keystore_file) == stat_mode(secrets.master_key_file) == 0o600


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_setup_imports_a_key_file_an_earlier_setup_wrote(tmp_path):
    """A deployment set up before references has secrets/totp.key beside the keystore: its key
    moves into the keystore unchanged (enrolled TOTP secrets still open), and the output says
    to delete the file."""
    legacy = tmp_path / "secrets/totp.key"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(new_sealing_key() + "\n")
    legacy.chmod(0o600)
    config = config_with(tmp_path)
    done = provision_all(config)
    assert done[1] == (
        f"imported {legacy} into keystore:totp-key (version 1); it is no longer read: delete it "
        f"(shred -u {legacy})"
    )
    assert stored(config, "totp-key") == legacy.read_text().strip()
    assert done[0] is not None
    assert done[0].startswith("wrote keystore:session-key")


def test_setup_leaves_env_and_vault_keys_to_their_operator(tmp_path, monkeypatch):
    """Nothing is written for env: or vault: references (and env: is not read by setup)."""
    monkeypatch.setenv("EMP_TEST_SESSION_KEY", "x")
    config = config_with(tmp_path, '[identity.sessions]\nkey = "env:EMP_TEST_SESSION_KEY"\n')
    session = next(k for k in keys.gateway_keys(config) if k.name == "session_key")
    assert keys.provision_key(session, config.secrets) is None
    assert os.environ["EMP_TEST_SESSION_KEY"] == "x"


# --- `gateway secrets check` -----------------------------------------------------------------


def test_secrets_check_lists_each_key_by_reference_with_the_keystore_s_date(tmp_path, monkeypatch):
    """A keystore key is listed once, under its own name, with its reference and version; its
    age is the version's date. Other keystore entries are listed as keystore:NAME. An env:
    key's age is unknown. No value is shown."""
    monkeypatch.setenv("EMP_TEST_MODEL_KEY", anomaly.new_key())
    config = config_with(
        tmp_path,
        f'[audit]\ncheckpoint_key = "file:{tmp_path}/checkpoint.pem"\n'
        '[validation]\nmodel_key = "env:EMP_TEST_MODEL_KEY"\n',
    )
    provision_all(config)
    secrets = config.secrets
    Keystore.open(secrets.keystore_file, secrets.master_key_file).put("emp-data-keys", "{}")
    states = {state.name: state for state in inventory(config)}
    session = states["session_key"]
    assert (session.source, session.status) == ("keystore:session-key", "ok")
    assert session.note == "keystore:session-key, version 1"
    assert 0 <= session.age_seconds < 600
    assert states["totp_key"].source == "keystore:totp-key"
    assert states["audit_checkpoint_key"].source == f"file:{tmp_path}/checkpoint.pem"
    assert 0 <= states["audit_checkpoint_key"].age_seconds < 600
    model = states["model_key"]
    assert (model.status, model.age_seconds, model.source) == ("ok", None, "env:EMP_TEST_MODEL_KEY")
    assert "EMP_TEST_MODEL_KEY" in os.environ  # the check does not consume the variable
    assert "keystore:session-key" not in states  # not listed twice
    assert "keystore:emp-data-keys" in states
    later = {s.name: s for s in inventory(config, now=time.time() + 80 * DAY)}
    assert later["session_key"].status == "due"
    printed = render(list(states.values())) + json.dumps([s.public() for s in states.values()])
    for name in ("session-key", "totp-key"):
        assert stored(config, name) not in printed
    assert os.environ["EMP_TEST_MODEL_KEY"] not in printed


def test_secrets_check_says_missing_when_the_keystore_lacks_a_key(tmp_path):
    """A key whose keystore entry is gone is missing (`secrets check` exits 1)."""
    config = config_with(tmp_path)
    provision_all(config)
    _missing_entry(config)
    state = {s.name: s for s in inventory(config)}["session_key"]
    assert (state.status, state.failing, state.source) == ("missing", True, "keystore:session-key")
