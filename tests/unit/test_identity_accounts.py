"""Accounts of the built-in identity provider: argon2id passwords (real argon2, low cost), the
DuckDB store (real files in tmp_path), client secrets, and the lock the running gateway holds."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import argon2
import duckdb
import pytest
from structlog.testing import capture_logs
from support.identity import FAST_PASSWORDS
from support.stack import REPO

from gateway.config import PasswordConfig
from gateway.identity import manage
from gateway.identity.accounts import AccountExists, AccountNotFound, AccountStore, StoreLocked
from gateway.identity.passwords import (
    Passwords,
    legacy_digest,
    validate_client_id,
    validate_role,
    validate_username,
)

FAST = FAST_PASSWORDS
PASSWORD = "Quokka-Lantern-7731"


def all_bytes(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


# Passwords


def test_hash_is_argon2id_and_checks(passwords):
    """A fresh hash is argon2id with the configured parameters and accepts its password."""
    stored = passwords.hash(PASSWORD)
    assert stored.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert PASSWORD not in stored
    assert passwords.check("argon2id", stored, PASSWORD) == (True, False)


def test_wrong_password_is_false_without_upgrade(passwords):
    """A wrong password is (False, False), not an exception."""
    stored = passwords.hash(PASSWORD)
    assert passwords.check("argon2id", stored, PASSWORD + "x") == (False, False)
    assert passwords.check("argon2id", stored, "") == (False, False)


def test_changed_parameters_ask_for_an_upgrade():
    """A hash made with time_cost=1 checked under time_cost=2 is right but needs re-hashing."""
    old = Passwords(FAST).hash(PASSWORD)
    current = Passwords(PasswordConfig(time_cost=2, memory_kib=64, parallelism=1))
    assert current.check("argon2id", old, PASSWORD) == (True, True)
    assert current.check("argon2id", old, "wrong password") == (False, False)
    assert current.check("argon2id", current.hash(PASSWORD), PASSWORD) == (True, False)


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
def test_legacy_wrapped_hash_logs_in_once_then_is_upgraded(passwords, store, algorithm):
    """argon2id(hex(HASH(pw))) accepts pw and asks for an upgrade; the re-hash is plain argon2id."""
    wrapped = passwords.hash(legacy_digest(algorithm, PASSWORD))
    store.add_user("legacy", wrapped, f"argon2id+{algorithm}", ["reader"])
    user = store.get_user("legacy")
    assert passwords.check(user.hash_scheme, user.password_hash, PASSWORD) == (True, True)
    assert passwords.check(user.hash_scheme, user.password_hash, "not it") == (False, False)
    # The legacy digest itself is not a password: an attacker who has it cannot log in with it.
    digest = legacy_digest(algorithm, PASSWORD)
    assert passwords.check(user.hash_scheme, user.password_hash, digest) == (False, False)

    store.update_password_hash("legacy", passwords.hash(PASSWORD), "argon2id")
    upgraded = store.get_user("legacy")
    assert upgraded.hash_scheme == "argon2id"
    assert passwords.check(upgraded.hash_scheme, upgraded.password_hash, PASSWORD) == (True, False)


@pytest.mark.parametrize(
    ("scheme", "stored"),
    [
        ("argon2id", "not-a-hash-SENTINEL"),
        ("argon2id", "$argon2id$v=19$m=64,t=1,p=1$SENTINEL$SENTINEL"),
        ("argon2id", "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$SENTINELSENTINEL"),
        ("argon2id+md4", "$argon2id$v=19$m=64,t=1,p=1$SENTINEL$SENTINEL"),
        ("bcrypt", "$2b$12$SENTINEL"),
        ("", ""),
    ],
    ids=["garbage", "bad-base64", "argon2i-not-id", "unknown-wrap", "unknown-scheme", "empty"],
)
def test_corrupt_or_unknown_hash_is_false_and_logged_without_the_value(passwords, scheme, stored):
    """A stored value the checker cannot use denies, warns once, and never logs the value."""
    with capture_logs() as logs:
        assert passwords.check(scheme, stored, PASSWORD) == (False, False)
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "SENTINEL" not in repr(logs)
    assert PASSWORD not in repr(logs)


def test_dummy_verify_costs_a_real_verify_with_the_real_parameters():
    """The dummy hash uses the configured (default, OWASP) parameters, so it costs the same."""
    real = Passwords(PasswordConfig())
    parameters = argon2.extract_parameters(real._dummy_hash)
    assert (parameters.type, parameters.time_cost, parameters.memory_cost) == (
        argon2.Type.ID,
        2,
        19_456,
    )
    assert parameters.parallelism == 1
    assert parameters == argon2.extract_parameters(real.hash(PASSWORD))
    assert real.verify_dummy(PASSWORD) is None
    assert real.verify_dummy("") is None


@pytest.mark.parametrize(
    ("username", "password", "problem"),
    [
        ("alice", "short-11chr", "at least 12 characters"),
        ("alice", "x" * 1025, "at most 1024 characters"),
        ("Alice.Longname", "aLICE.lONGNAME", "must not be the username"),
        ("alice", "nul-inside\x00-password", "control characters"),
        ("alice", "newline-inside\n-password", "control characters"),
        ("alice", "delete-char\x7f-password", "control characters"),
    ],
    ids=["too-short", "too-long", "equals-username", "nul", "newline", "del"],
)
def test_new_password_rules_refuse_with_a_message_that_omits_it(
    passwords, username, password, problem
):
    """Each rule refuses with a message naming the rule, never the password."""
    with pytest.raises(ValueError, match=problem) as caught:
        passwords.validate_new_password(username, password)
    assert password not in str(caught.value)


@pytest.mark.parametrize(
    "password",
    ["twelve-chars", "x" * 1024, "pässwörd mit Leerzeichen", "🦘🦘🦘🦘🦘🦘🦘🦘🦘🦘🦘🦘"],
    ids=["exactly-min", "exactly-max", "unicode-and-spaces", "emoji"],
)
def test_new_password_rules_accept_good_passwords(passwords, password):
    """Passwords within the rules pass, spaces and non-ASCII included."""
    passwords.validate_new_password("alice", password)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("alice", True),
        ("a", True),
        ("A.b_c-d@example.org", True),
        ("9lives", True),
        ("x" * 64, True),
        ("", False),
        ("x" * 65, False),
        (".alice", False),
        ("-alice", False),
        ("@alice", False),
        ("al ice", False),
        ("alice\n", False),
        ("ålice", False),
        ("al/ice", False),
    ],
)
def test_username_rules(name, ok):
    """Usernames are 1-64 of [A-Za-z0-9._@-] starting alphanumeric; client ids follow the same."""
    for validate in (validate_username, validate_client_id):
        if ok:
            validate(name)
        else:
            with pytest.raises(ValueError, match="1-64 characters"):
                validate(name)


@pytest.mark.parametrize(
    ("role", "ok"),
    [
        ("admin", True),
        ("hr_clerk2", True),
        ("r" + "x" * 63, True),
        ("", False),
        ("Admin", False),
        ("2fa", False),
        ("_admin", False),
        ("hr-clerk", False),
        ("r" + "x" * 64, False),
    ],
)
def test_role_rules(role, ok):
    """Roles are [a-z][a-z0-9_]{0,63}, the policy's vocabulary."""
    if ok:
        validate_role(role)
    else:
        with pytest.raises(ValueError, match="lower-case letter"):
            validate_role(role)


# The store


def test_new_store_is_private_and_versioned(tmp_path):
    """The file (and its write-ahead log) are 0600 from the start; schema_version is recorded."""
    path = tmp_path / "deep" / "dir" / "identity.duckdb"
    with AccountStore.open(path) as store:
        store.add_user("alice", "$argon2id$placeholder", "argon2id", ["reader"])
        wal = path.with_name(path.name + ".wal")
        assert wal.exists(), "the write is still in the log before a checkpoint"
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.duckdb"]
    with duckdb.connect(str(path), read_only=True) as db:
        assert db.execute("SELECT value FROM identity_meta").fetchall() == [("1",)]


def test_unknown_schema_version_refuses_to_open(tmp_path):
    """A store written by a different schema version is refused, not misread."""
    path = tmp_path / "identity.duckdb"
    AccountStore.open(path).close()
    with duckdb.connect(str(path)) as db:
        db.execute("UPDATE identity_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RuntimeError, match="schema_version 99"):
        AccountStore.open(path)


def test_users_are_found_in_any_case_and_keep_their_spelling(store, tmp_path):
    """Lookups ignore case; the name is stored and listed as given; it survives a reopen."""
    store.add_user("Alice.Smith", "$argon2id$h", "argon2id", ["reader", "clerk"])
    for spelling in ("Alice.Smith", "alice.smith", "ALICE.SMITH"):
        user = store.get_user(spelling)
        assert user is not None
        assert user.username == "Alice.Smith"
    assert store.get_user("alice") is None
    user = store.get_user("alice.smith")
    assert (user.roles, user.status, user.mfa_state) == (("reader", "clerk"), "active", "none")
    assert user.created_at.tzinfo is not None
    store.close()
    with AccountStore.open(store.path) as again:
        assert [u.username for u in again.list_users()] == ["Alice.Smith"]


def test_a_name_taken_in_any_case_is_refused(store):
    """Adding "ALICE" when "alice" exists raises AccountExists and changes nothing."""
    store.add_user("alice", "$argon2id$first", "argon2id", ["reader"])
    with pytest.raises(AccountExists, match="already exists: alice"):
        store.add_user("ALICE", "$argon2id$second", "argon2id", ["admin"])
    assert store.get_user("alice").password_hash == "$argon2id$first"
    assert len(store.list_users()) == 1


def test_mutators_on_unknown_accounts_raise_not_found(store):
    """Every mutator names the missing user or client instead of silently doing nothing."""
    calls = [
        lambda: store.set_roles("ghost", ["reader"]),
        lambda: store.set_status("ghost", "disabled"),
        lambda: store.update_password_hash("ghost", "$argon2id$x", "argon2id"),
        lambda: store.set_mfa("ghost", "none", None, []),
        lambda: store.consume_recovery_hash("ghost", "h"),
        lambda: store.set_client_secret("ghost", "$argon2id$x"),
        lambda: store.set_client_status("ghost", "disabled"),
    ]
    for call in calls:
        with pytest.raises(AccountNotFound, match="ghost"):
            call()


def test_disable_enable_and_roles(store, passwords):
    """Status and roles change in place and updated_at moves; bad values are refused."""
    manage.add_user(store, passwords, "bob", PASSWORD, ["reader"])
    before = store.get_user("bob")
    assert manage.disable_user(store, "BOB")["status"] == "disabled"
    assert store.get_user("bob").status == "disabled"
    assert manage.enable_user(store, "bob")["status"] == "active"
    info = manage.set_roles(store, "bob", ["clerk", "reader", "clerk"])
    assert info["roles"] == ["clerk", "reader"], "de-duplicated, order kept"
    assert store.get_user("bob").updated_at >= before.updated_at
    with pytest.raises(ValueError, match="status"):
        store.set_status("bob", "deleted")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower-case letter"):
        manage.set_roles(store, "bob", ["Admin"])
    assert store.get_user("bob").roles == ("clerk", "reader")


def test_manage_add_user_enforces_the_password_rules(store, passwords):
    """The CLI path refuses a weak password before storing anything, without echoing it."""
    with pytest.raises(ValueError, match="at least 12") as caught:
        manage.add_user(store, passwords, "carol", "tiny-pw", ["reader"])
    assert "tiny-pw" not in str(caught.value)
    assert store.list_users() == []
    info = manage.add_user(store, passwords, "carol", PASSWORD, ["reader"])
    assert set(info) == {
        "username", "roles", "status", "mfa_state", "recovery_codes_left", "created_at",
        "updated_at",
    }  # fmt: skip
    with pytest.raises(AccountExists):
        manage.add_user(store, passwords, "Carol", PASSWORD, ["reader"])
    user = store.get_user("carol")
    assert passwords.check(user.hash_scheme, user.password_hash, PASSWORD) == (True, False)


def test_mfa_fields_round_trip_and_stay_out_of_public_views(store):
    """Sealed secret and recovery hashes are stored, but neither public() nor repr shows them."""
    store.add_user("dave", "$argon2id$HASHVALUE", "argon2id", ["admin"])
    store.set_mfa("dave", "enabled", "SEALED-TOTP-SECRET", ["rc-hash-1", "rc-hash-2"])
    user = store.get_user("dave")
    assert (user.mfa_state, user.mfa_secret_sealed) == ("enabled", "SEALED-TOTP-SECRET")
    assert user.recovery_hashes == ("rc-hash-1", "rc-hash-2")
    shown = json.dumps(user.public()) + repr(user) + json.dumps(manage.list_users(store))
    for secret in ("HASHVALUE", "SEALED-TOTP-SECRET", "rc-hash-1"):
        assert secret not in shown
    assert user.public()["recovery_codes_left"] == 2
    with pytest.raises(ValueError, match="sealed secret"):
        store.set_mfa("dave", "none", "SEALED", [])
    with pytest.raises(ValueError, match="sealed secret"):
        store.set_mfa("dave", "enabled", None, [])
    store.set_mfa("dave", "none", None, [])
    cleared = store.get_user("dave")
    assert (cleared.mfa_state, cleared.mfa_secret_sealed, cleared.recovery_hashes) == (
        "none",
        None,
        (),
    )


def test_a_recovery_hash_is_consumed_exactly_once_even_under_races(store):
    """Sixteen threads consuming the same code: exactly one wins; the other code stays."""
    store.add_user("erin", "$argon2id$h", "argon2id", ["admin"])
    store.set_mfa("erin", "enabled", "sealed", ["code-a", "code-b"])
    barrier = threading.Barrier(16)

    def consume(_: int) -> bool:
        barrier.wait()
        return store.consume_recovery_hash("ERIN", "code-a")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(consume, range(16)))
    assert results.count(True) == 1
    assert store.get_user("erin").recovery_hashes == ("code-b",)
    assert store.consume_recovery_hash("erin", "code-a") is False
    assert store.consume_recovery_hash("erin", "code-b") is True
    assert store.get_user("erin").recovery_hashes == ()


def test_worker_threads_share_one_store(store):
    """Many threads adding users at once through one store lose nothing and corrupt nothing."""

    def add(i: int) -> None:
        store.add_user(f"user{i:03d}", f"$argon2id${i}", "argon2id", ["reader"])
        assert store.get_user(f"USER{i:03d}") is not None

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(add, range(120)))
    assert [u.username for u in store.list_users()] == [f"user{i:03d}" for i in range(120)]


# Clients


def test_client_secret_is_returned_once_and_stored_only_as_a_hash(tmp_path, passwords):
    """The secret comes back from add_client only; the DuckDB file and listings never hold it."""
    path = tmp_path / "identity.duckdb"
    with AccountStore.open(path) as store:
        info, secret = manage.add_client(store, passwords, "ingest-1", ["ingest"])
        assert len(secret) >= 43, "token_urlsafe(32): 256 bits"
        assert info == manage.list_clients(store)[0]
        assert secret not in json.dumps(manage.list_clients(store))
        assert store.get_client("ingest-1").secret_hash.startswith("$argon2id$")
        assert secret.encode() not in all_bytes(tmp_path), "not even in the write-ahead log"
        with pytest.raises(AccountExists):
            manage.add_client(store, passwords, "ingest-1", ["ingest"])
    assert secret.encode() not in all_bytes(tmp_path)
    assert b"ingest-1" in all_bytes(tmp_path), "the scan does read the store's bytes"


def test_verify_client_right_wrong_unknown_disabled_rotated(store, passwords):
    """Only the current secret of an active client verifies; every failure is plain None."""
    _, secret = manage.add_client(store, passwords, "ingest-2", ["ingest"])
    client = manage.verify_client(store, passwords, "ingest-2", secret)
    assert client is not None
    assert (client.client_id, client.roles) == ("ingest-2", ("ingest",))
    assert manage.verify_client(store, passwords, "ingest-2", secret + "x") is None
    assert manage.verify_client(store, passwords, "INGEST-2", secret) is None, "ids are exact"
    assert manage.verify_client(store, passwords, "nobody", secret) is None

    info, new_secret = manage.rotate_client_secret(store, passwords, "ingest-2")
    assert new_secret != secret
    assert info["rotated_at"] >= info["created_at"]
    assert manage.verify_client(store, passwords, "ingest-2", secret) is None
    assert manage.verify_client(store, passwords, "ingest-2", new_secret) is not None

    store.set_client_status("ingest-2", "disabled")
    assert manage.verify_client(store, passwords, "ingest-2", new_secret) is None


# The write lock

HOLD_STORE = """
import sys
from pathlib import Path
from gateway.identity.accounts import AccountStore

store = AccountStore.open(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.read()
store.close()
"""


def test_store_held_by_another_process_raises_store_locked(tmp_path):
    """While another process (the gateway) holds the file, open() raises StoreLocked."""
    path = tmp_path / "identity.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_STORE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match="running gateway") as caught:
            AccountStore.open(path)
        assert caught.value.path == path
        assert isinstance(caught.value, RuntimeError)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    with AccountStore.open(path) as store:
        assert store.list_users() == []
