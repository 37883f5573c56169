"""Secret providers: reference parsing, env:, file:, the encrypted keystore, and what never leaks.

Vault is tested against a real OpenBao server in tests/integration/test_vault_provider.py; here
only the checks that happen before any request.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from empsecrets.providers import (
    MASTER_KEY_BYTES,
    EnvReference,
    FileReference,
    InsecureSecretFileError,
    Keystore,
    KeystoreEntry,
    KeystoreError,
    KeystoreIntegrityError,
    KeystoreReference,
    ProviderSettings,
    Secret,
    SecretError,
    SecretNotFoundError,
    SecretReferenceError,
    VaultError,
    VaultReference,
    VaultSettings,
    WrongMasterKeyError,
    _check_vault_address,
    parse_reference,
    resolve,
)

VALUE = "s3cret-Value-that-must-never-show"


def write_secret_file(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    path.chmod(mode)
    return path


@pytest.fixture
def keystore(tmp_path) -> Keystore:
    return Keystore.create(
        tmp_path / "secrets" / "keystore.json", tmp_path / "secrets" / "keystore.master"
    )


@pytest.fixture
def settings(keystore) -> ProviderSettings:
    return ProviderSettings(keystore_file=keystore.path, master_key_file=keystore.master_path)


def read_document(keystore: Keystore) -> dict:
    return json.loads(keystore.path.read_bytes())


def write_document(keystore: Keystore, document: dict) -> None:
    keystore.path.write_text(json.dumps(document), encoding="utf-8")
    keystore.path.chmod(0o600)


def flip_last_bit(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[-1] ^= 0x01
    return base64.b64encode(bytes(raw)).decode("ascii")


# --- references ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("env:EMP_UPSTREAM_SECRET", EnvReference("EMP_UPSTREAM_SECRET")),
        ("file:/etc/emp/upstream.secret", FileReference(Path("/etc/emp/upstream.secret"))),
        ("file:var/secrets/upstream.secret", FileReference(Path("var/secrets/upstream.secret"))),
        ("keystore:upstream", KeystoreReference("upstream")),
        ("keystore:client.emp-cli_2", KeystoreReference("client.emp-cli_2")),
        ("vault:secret/emp/upstream#value", VaultReference("secret", "emp/upstream", "value")),
        ("vault:kv/a#b", VaultReference("kv", "a", "b")),
    ],
    ids=[
        "env",
        "file absolute",
        "file relative",
        "keystore",
        "keystore dotted",
        "vault",
        "vault short",
    ],
)
def test_a_reference_parses_to_its_typed_form_and_prints_back(text, expected):
    """Each scheme parses to its own type, and str() gives the reference text back (the source)."""
    parsed = parse_reference(text)
    assert parsed == expected
    assert str(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        "hunter2-pasted-instead-of-a-reference",
        "http://vault.example/secret",
        "",
        "ENV:NAME",
        "env:",
        "env:1STARTS_WITH_DIGIT",
        "env:HAS-DASH",
        "file:",
        "keystore:",
        "keystore:../upstream",
        "keystore:a/b",
        "keystore:" + "x" * 129,
        "vault:kv#token",
        "vault:kv/gw/api",
        "vault:kv/gw/api#",
        "vault:/gw/api#token",
        "vault:kv//api#token",
        "vault:kv/../sys/seal#token",
        "vault:kv/gw/./api#token",
        "vault:kv/gw/api?x=1#token",
    ],
    ids=[
        "should fail because there is no scheme",
        "should fail because http is not a scheme of ours",
        "should fail because it is empty",
        "should fail because schemes are lower case",
        "should fail because the env name is empty",
        "should fail because an env name cannot start with a digit",
        "should fail because an env name has no dash",
        "should fail because the file path is empty",
        "should fail because the keystore name is empty",
        "should fail because a keystore name cannot climb",
        "should fail because a keystore name has no slash",
        "should fail because a keystore name is at most 128 characters",
        "should fail because vault needs MOUNT/PATH",
        "should fail because vault needs #FIELD",
        "should fail because the vault field is empty",
        "should fail because the vault mount is empty",
        "should fail because a vault path has an empty part",
        "should fail because a vault path cannot climb out of its mount",
        "should fail because a vault path has a dot part",
        "should fail because a vault path has a query",
    ],
)
def test_a_malformed_reference_is_refused_without_echoing_it(text):
    """A bad reference is SecretReferenceError whose message does not quote the text."""
    with pytest.raises(SecretReferenceError) as caught:
        parse_reference(text)
    _, colon, target = text.partition(":")
    echoed = target if colon else text
    if echoed:
        assert echoed not in str(caught.value)


def test_a_secret_pasted_as_a_reference_is_not_in_the_message(settings):
    """A value pasted where a reference belongs (it has a colon) does not reach the error text."""
    pasted = "correct-horse:battery-staple"
    with pytest.raises(SecretReferenceError) as caught:
        resolve(pasted, settings=settings)
    assert "battery-staple" not in str(caught.value)
    assert "correct-horse" not in str(caught.value)
    assert "env, file, keystore, vault" in str(caught.value)


def test_an_unknown_scheme_is_refused_by_resolve(settings):
    """resolve() dispatches only the four schemes: aws:... is SecretReferenceError."""
    with pytest.raises(SecretReferenceError, match="scheme"):
        resolve("aws:secretsmanager/emp", settings=settings)


# --- env: ----------------------------------------------------------------------------------


def test_env_reads_the_variable_then_removes_it(monkeypatch, settings):
    """env:NAME gives the value, and afterwards os.environ no longer has the variable."""
    monkeypatch.setenv("EMP_TEST_SECRET", VALUE)
    secret = resolve("env:EMP_TEST_SECRET", settings=settings)
    assert secret.value == VALUE
    assert (secret.created_at, secret.version, secret.source) == (None, None, "env:EMP_TEST_SECRET")
    assert "EMP_TEST_SECRET" not in os.environ
    assert VALUE not in repr(dict(os.environ))


def test_env_is_read_once_a_second_read_finds_nothing(monkeypatch, settings):
    """After the first read the variable is gone, so a second resolve is SecretNotFoundError."""
    monkeypatch.setenv("EMP_TEST_SECRET", VALUE)
    resolve("env:EMP_TEST_SECRET", settings=settings)
    with pytest.raises(SecretNotFoundError, match="env:EMP_TEST_SECRET"):
        resolve("env:EMP_TEST_SECRET", settings=settings)


def test_env_missing_is_not_found(monkeypatch, settings):
    """An unset variable is SecretNotFoundError naming the reference."""
    monkeypatch.delenv("EMP_TEST_SECRET", raising=False)
    with pytest.raises(SecretNotFoundError, match="env:EMP_TEST_SECRET"):
        resolve("env:EMP_TEST_SECRET", settings=settings)


def test_env_empty_is_refused(monkeypatch, settings):
    """An empty variable is refused (fail closed), not resolved to ''."""
    monkeypatch.setenv("EMP_TEST_SECRET", "")
    with pytest.raises(SecretError, match="empty"):
        resolve("env:EMP_TEST_SECRET", settings=settings)


# --- file: ---------------------------------------------------------------------------------


def test_file_reads_a_0600_file_and_dates_it_by_mtime(tmp_path, settings):
    """file:PATH gives the text without its newline; created_at is the file's mtime in UTC."""
    path = write_secret_file(tmp_path / "upstream.secret", VALUE + "\n")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    secret = resolve(f"file:{path}", settings=settings)
    assert secret.value == VALUE
    assert secret.created_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert secret.version is None
    assert secret.source == f"file:{path}"


def test_file_relative_path_is_from_the_working_directory(tmp_path, monkeypatch, settings):
    """file:var/... is read relative to the working directory, like every path in config."""
    write_secret_file(tmp_path / "var" / "s.secret", "relative")
    monkeypatch.chdir(tmp_path)
    assert resolve("file:var/s.secret", settings=settings).value == "relative"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("abc", "abc"),
        ("abc\n", "abc"),
        ("abc\r\n", "abc"),
        ("abc\n\n", "abc\n"),
        (" abc \n", " abc "),
    ],
    ids=[
        "no newline",
        "one newline",
        "one CRLF",
        "only one newline is stripped",
        "spaces are the secret's",
    ],
)
def test_file_strips_exactly_one_trailing_newline(tmp_path, settings, content, expected):
    """One trailing newline (editors, echo) goes; anything else is part of the secret."""
    path = write_secret_file(tmp_path / "s.secret", content)
    assert resolve(f"file:{path}", settings=settings).value == expected


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o610])
def test_file_readable_or_writable_by_others_is_refused(tmp_path, settings, mode):
    """Any group or other permission bit refuses the file, naming the path and the mode."""
    path = write_secret_file(tmp_path / "s.secret", VALUE, mode)
    with pytest.raises(InsecureSecretFileError) as caught:
        resolve(f"file:{path}", settings=settings)
    message = str(caught.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert VALUE not in message


def test_file_with_owner_bits_only_is_accepted(tmp_path, settings):
    """0400 and 0700 give nobody else access, so they are accepted."""
    for mode in (0o400, 0o700):
        path = write_secret_file(tmp_path / f"s-{mode:o}.secret", "ok", mode)
        assert resolve(f"file:{path}", settings=settings).value == "ok"


def test_file_symlink_is_refused_even_to_a_private_file(tmp_path, settings):
    """A symlink is refused although its target is 0600: whoever owns the link can re-point it."""
    target = write_secret_file(tmp_path / "real.secret", VALUE)
    link = tmp_path / "link.secret"
    link.symlink_to(target)
    with pytest.raises(InsecureSecretFileError, match="symbolic link"):
        resolve(f"file:{link}", settings=settings)


def test_file_missing_is_not_found(tmp_path, settings):
    """A missing file is SecretNotFoundError naming the path."""
    path = tmp_path / "absent.secret"
    with pytest.raises(SecretNotFoundError, match=str(path)):
        resolve(f"file:{path}", settings=settings)


def test_file_that_is_a_directory_or_fifo_is_refused(tmp_path, settings):
    """A directory or a FIFO is not a regular file; the FIFO does not block the read."""
    directory = tmp_path / "dir.secret"
    directory.mkdir(mode=0o700)
    fifo = tmp_path / "fifo.secret"
    os.mkfifo(fifo, 0o600)
    for path in (directory, fifo):
        with pytest.raises(InsecureSecretFileError, match="not a regular file"):
            resolve(f"file:{path}", settings=settings)


def test_file_not_utf8_is_refused(tmp_path, settings):
    """A binary file is refused: these secrets are text."""
    path = write_secret_file(tmp_path / "s.secret", b"\xff\xfe\x00")
    with pytest.raises(SecretError, match="UTF-8"):
        resolve(f"file:{path}", settings=settings)


# --- keystore: -----------------------------------------------------------------------------


def test_create_writes_a_private_keystore_and_a_32_byte_master_key(keystore):
    """create() makes both files 0600; the master key is 32 bytes."""
    assert stat.S_IMODE(keystore.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keystore.master_path.stat().st_mode) == 0o600
    assert len(keystore.master_path.read_bytes()) == MASTER_KEY_BYTES
    assert keystore.list() == []


def test_open_never_creates_the_master_key_or_the_keystore(tmp_path):
    """open() on an empty directory refuses and leaves it empty: keys are created explicitly."""
    with pytest.raises(KeystoreError, match="create it first"):
        Keystore.open(tmp_path / "keystore.json", tmp_path / "keystore.master")
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_an_existing_keystore(keystore):
    """A second create() on the same path is refused: it would orphan every entry."""
    keystore.put("upstream", VALUE)
    with pytest.raises(KeystoreError, match="exists already"):
        Keystore.create(keystore.path, keystore.master_path)
    assert Keystore.open(keystore.path, keystore.master_path).get("upstream").value == VALUE


def test_create_uses_a_master_key_placed_beforehand(tmp_path):
    """A master key already on another mount is used as it is, not replaced."""
    master = write_secret_file(tmp_path / "hsm-mount" / "keystore.master", os.urandom(32))
    before = master.read_bytes()
    store = Keystore.create(tmp_path / "keystore.json", master)
    store.put("upstream", VALUE)
    assert master.read_bytes() == before
    assert Keystore.open(tmp_path / "keystore.json", master).get("upstream").value == VALUE


def test_keystore_round_trip_through_resolve(keystore, settings):
    """A value put under a name comes back from keystore:NAME with its version and date."""
    entry = keystore.put("upstream", VALUE)
    secret = resolve("keystore:upstream", settings=settings)
    assert secret.value == VALUE
    assert secret.version == entry.version == 1
    assert secret.created_at == entry.created_at
    assert secret.created_at is not None
    assert secret.created_at.tzinfo is not None
    assert secret.source == "keystore:upstream"


def test_keystore_versions_increment_on_each_put(keystore):
    """Each put is a new version; get returns the latest value and its version."""
    versions = [keystore.put("upstream", f"value-{n}").version for n in range(3)]
    assert versions == [1, 2, 3]
    latest = keystore.get("upstream")
    assert (latest.value, latest.version) == ("value-2", 3)


def test_keystore_missing_name_is_not_found(keystore):
    """A name never put is SecretNotFoundError naming it."""
    keystore.put("upstream", VALUE)
    with pytest.raises(SecretNotFoundError, match="'absent'"):
        keystore.get("absent")


def test_keystore_delete_removes_the_entry(keystore):
    """After delete the name is not found, deleting again is refused, a new put is version 1."""
    keystore.put("upstream", VALUE)
    keystore.put("upstream", VALUE + "2")
    keystore.delete("upstream")
    with pytest.raises(SecretNotFoundError):
        keystore.get("upstream")
    with pytest.raises(SecretNotFoundError):
        keystore.delete("upstream")
    assert keystore.put("upstream", VALUE).version == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("../escape", "x"), ("", "x"), ("ok", "")],
    ids=[
        "should fail because the name climbs",
        "should fail because the name is empty",
        "should fail because the value is empty",
    ],
)
def test_keystore_put_refuses_bad_names_and_empty_values(keystore, name, value):
    """put() checks the name against the reference syntax and refuses an empty value."""
    with pytest.raises(KeystoreError):
        keystore.put(name, value)
    assert keystore.list() == []


def test_keystore_list_shows_names_dates_versions_never_values(keystore):
    """list() returns name, created_at and version only; no value appears anywhere in it."""
    keystore.put("upstream", VALUE)
    keystore.put("upstream", VALUE + "-2")
    keystore.put("client.cli", "client-secret-value")
    listed = keystore.list()
    assert [(entry.name, entry.version) for entry in listed] == [("client.cli", 1), ("upstream", 2)]
    assert [field.name for field in dataclasses.fields(KeystoreEntry)] == [
        "name",
        "created_at",
        "version",
    ]
    assert VALUE not in repr(listed)
    assert "client-secret-value" not in repr(listed)


def test_keystore_file_never_contains_the_plaintext(keystore):
    """Neither the value's bytes nor their base64 appear in the keystore file."""
    keystore.put("upstream", VALUE)
    keystore.put("other", VALUE + "-other")
    raw = keystore.path.read_bytes()
    assert VALUE.encode() not in raw
    assert base64.b64encode(VALUE.encode()) not in raw
    assert b"upstream" in raw  # names are not secret: list() needs them without the key


def test_keystore_stays_0600_after_writes_even_with_an_open_umask(keystore):
    """Every write leaves the file 0600, whatever the process umask."""
    previous = os.umask(0)
    try:
        keystore.put("upstream", VALUE)
        keystore.put("other", VALUE)
        keystore.delete("other")
        keystore.rotate_master(os.urandom(32))
    finally:
        os.umask(previous)
    for path in (keystore.path, keystore.master_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("field", ["ciphertext", "nonce"])
def test_keystore_tampered_entry_is_refused(keystore, field):
    """One flipped bit in an entry's ciphertext (or tag) or nonce fails authentication."""
    keystore.put("upstream", VALUE)
    document = read_document(keystore)
    document["entries"]["upstream"][field] = flip_last_bit(document["entries"]["upstream"][field])
    write_document(keystore, document)
    with pytest.raises(KeystoreIntegrityError) as caught:
        keystore.get("upstream")
    assert "'upstream'" in str(caught.value)
    assert VALUE not in str(caught.value)


def test_keystore_entries_swapped_between_names_are_refused(keystore):
    """An entry copied under another name does not open: the name is the associated data."""
    keystore.put("upstream", VALUE)
    keystore.put("readonly", "the-weaker-secret")
    document = read_document(keystore)
    entries = document["entries"]
    entries["upstream"], entries["readonly"] = entries["readonly"], entries["upstream"]
    write_document(keystore, document)
    with pytest.raises(KeystoreIntegrityError):
        keystore.get("upstream")
    with pytest.raises(KeystoreIntegrityError):
        keystore.get("readonly")


def test_keystore_wrong_master_key_is_refused_without_key_material(keystore, tmp_path):
    """Another master key is WrongMasterKeyError; the message has neither key in any encoding."""
    keystore.put("upstream", VALUE)
    other = os.urandom(32)
    other_path = write_secret_file(tmp_path / "other.master", other)
    with pytest.raises(WrongMasterKeyError) as caught:
        Keystore.open(keystore.path, other_path)
    message = str(caught.value)
    for key in (other, keystore.master_path.read_bytes()):
        assert key.hex() not in message
        assert base64.b64encode(key).decode() not in message
    assert VALUE not in message


@pytest.mark.parametrize("which", ["keystore", "master"])
def test_keystore_or_master_readable_by_others_is_refused(keystore, which):
    """A keystore or master key file with group/other bits is refused on open."""
    keystore.put("upstream", VALUE)
    path = keystore.path if which == "keystore" else keystore.master_path
    path.chmod(0o640)
    with pytest.raises(InsecureSecretFileError, match="0640"):
        Keystore.open(keystore.path, keystore.master_path)


def test_master_key_of_the_wrong_length_is_refused(tmp_path):
    """A master key file that is not exactly 32 bytes is refused, not padded or cut."""
    master = write_secret_file(tmp_path / "keystore.master", os.urandom(16))
    with pytest.raises(KeystoreError, match="exactly 32 bytes, not 16"):
        Keystore.create(tmp_path / "keystore.json", master)


def test_keystore_that_is_not_json_is_refused(keystore):
    """A garbled keystore file is KeystoreError, not a crash or an empty store."""
    write_secret_file(keystore.path, b"{not json")
    with pytest.raises(KeystoreError, match="not JSON"):
        keystore.get("upstream")


def test_rotate_master_with_bytes_reencrypts_everything(keystore, tmp_path):
    """New master bytes: values, versions and dates stay; the file's bytes change; the old key
    no longer opens it; the master key file holds the new key; no staged file is left."""
    keystore.put("upstream", VALUE)
    keystore.put("upstream", VALUE + "-v2")
    keystore.put("other", "other-value")
    before_list = keystore.list()
    before_bytes = keystore.path.read_bytes()
    old_master = write_secret_file(tmp_path / "old.master", keystore.master_path.read_bytes())
    new_key = os.urandom(32)

    keystore.rotate_master(new_key)

    assert keystore.master_path.read_bytes() == new_key
    assert keystore.path.read_bytes() != before_bytes
    assert not keystore.master_path.with_name(keystore.master_path.name + ".next").exists()
    reopened = Keystore.open(keystore.path, keystore.master_path)
    assert reopened.list() == before_list
    assert reopened.get("upstream").value == VALUE + "-v2"
    assert reopened.get("other").value == "other-value"
    with pytest.raises(WrongMasterKeyError):
        Keystore.open(keystore.path, old_master)


def test_rotate_master_to_a_new_path_creates_it_and_leaves_the_old(keystore, tmp_path):
    """A new master path is created (32 bytes, 0600) and used; the old key no longer opens it."""
    keystore.put("upstream", VALUE)
    old_path = keystore.master_path
    new_path = tmp_path / "other-mount" / "keystore.master"

    keystore.rotate_master(new_path)

    assert keystore.master_path == new_path
    assert stat.S_IMODE(new_path.stat().st_mode) == 0o600
    assert len(new_path.read_bytes()) == 32
    assert Keystore.open(keystore.path, new_path).get("upstream").value == VALUE
    with pytest.raises(WrongMasterKeyError):
        Keystore.open(keystore.path, old_path)


def test_rotate_master_refuses_the_current_key(keystore):
    """Rotating to the same key is refused: it would look like a rotation and be none."""
    keystore.put("upstream", VALUE)
    with pytest.raises(KeystoreError, match="current one"):
        keystore.rotate_master(keystore.master_path.read_bytes())


def test_rotate_master_writes_nothing_when_an_entry_is_tampered(keystore):
    """A tampered entry aborts the rotation before any file changes."""
    keystore.put("upstream", VALUE)
    keystore.put("other", "other-value")
    document = read_document(keystore)
    document["entries"]["other"]["ciphertext"] = flip_last_bit(
        document["entries"]["other"]["ciphertext"]
    )
    write_document(keystore, document)
    keystore_bytes, master_bytes = keystore.path.read_bytes(), keystore.master_path.read_bytes()
    with pytest.raises(KeystoreIntegrityError):
        keystore.rotate_master(os.urandom(32))
    assert keystore.path.read_bytes() == keystore_bytes
    assert keystore.master_path.read_bytes() == master_bytes


def test_an_interrupted_rotation_is_named_on_open(keystore):
    """Keystore rewritten but master not yet replaced: open says where the new key waits."""
    keystore.put("upstream", VALUE)
    old_key = keystore.master_path.read_bytes()
    new_key = os.urandom(32)
    keystore.rotate_master(new_key)
    # Put the state back to "between the two renames": old key in place, new key staged.
    staged = write_secret_file(keystore.master_path.with_name("keystore.master.next"), new_key)
    write_secret_file(keystore.master_path, old_key)
    with pytest.raises(WrongMasterKeyError, match=r"keystore\.master\.next exists"):
        Keystore.open(keystore.path, keystore.master_path)
    staged.replace(keystore.master_path)
    assert Keystore.open(keystore.path, keystore.master_path).get("upstream").value == VALUE


# --- what never shows the value -------------------------------------------------------------


def test_repr_and_str_of_a_secret_never_show_the_value(tmp_path, monkeypatch, keystore, settings):
    """repr(), str() and f-strings of a Secret from every local provider hide the value."""
    monkeypatch.setenv("EMP_TEST_SECRET", VALUE)
    path = write_secret_file(tmp_path / "s.secret", VALUE)
    keystore.put("upstream", VALUE)
    secrets = [
        resolve(reference, settings=settings)
        for reference in ("env:EMP_TEST_SECRET", f"file:{path}", "keystore:upstream")
    ]
    for secret in secrets:
        assert secret.value == VALUE
        for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
            assert VALUE not in shown
            assert secret.source in shown


def test_a_secret_is_frozen():
    """A resolved secret cannot be changed in place."""
    secret = Secret(value=VALUE, created_at=None, version=None, source="env:X")
    with pytest.raises(dataclasses.FrozenInstanceError):
        secret.value = "other"  # type: ignore[misc]


# --- vault: checks before any request ------------------------------------------------------


def test_vault_reference_without_vault_settings_is_refused(settings):
    """A vault: reference when no Vault is configured is VaultError, with no request made."""
    with pytest.raises(VaultError, match="no Vault is configured"):
        resolve("vault:secret/emp/upstream#value", settings=settings)


def test_vault_over_plain_http_to_another_host_is_refused_before_the_token_is_read(tmp_path):
    """http:// to a non-loopback host is refused before the token reference is even resolved."""
    settings = ProviderSettings(
        vault=VaultSettings(
            address="http://vault.example:8200", token=f"file:{tmp_path / 'absent'}"
        )
    )
    with pytest.raises(VaultError, match="use https"):
        resolve("vault:secret/emp/upstream#value", settings=settings)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("https://vault.example:8200", True),
        ("https://10.0.0.5:8200", True),
        ("http://127.0.0.1:8200", True),
        ("http://127.8.9.1:8200", True),
        ("http://localhost:8200", True),
        ("http://[::1]:8200", True),
        ("http://vault.example:8200", False),
        ("http://10.0.0.5:8200", False),
        ("ftp://127.0.0.1", False),
        ("vault.example:8200", False),
        ("https://", False),
    ],
)
def test_vault_address_needs_https_unless_loopback(address, allowed):
    """The token crosses a network only over TLS; plain http is for loopback only."""
    if allowed:
        _check_vault_address(address)
    else:
        with pytest.raises(VaultError):
            _check_vault_address(address)
