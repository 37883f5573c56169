"""The legacy user import (all rows or none, plaintext purged) and the `gateway users` /
`gateway clients` commands end to end, each a real subprocess on a temp config."""

from __future__ import annotations

import csv
import getpass
import json
import logging
import os
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support.identity import FAST_PASSWORDS
from support.stack import GATEWAY, REPO

from gateway.identity import manage
from gateway.identity.accounts import AccountStore, NewUser
from gateway.identity.passwords import legacy_digest

FAST = FAST_PASSWORDS

# Unusual strings, so that finding one anywhere can only mean it leaked.
PLAIN_STRONG = "Okapi-Zither-4471-plaintext"
PLAIN_WEAK = "Vx3#wk"  # below min_length: a legacy password we import anyway
MD5_PASSWORD = "md5-Narwhal-Quince-9902"
SHA1_PASSWORD = "sha1-Axolotl-Fennel-5513"
SHA256_PASSWORD = "sha256-Pangolin-Dulcimer-2207"
LEGACY = {
    "md5": legacy_digest("md5", MD5_PASSWORD),
    "sha1": legacy_digest("sha1", SHA1_PASSWORD),
    "sha256": legacy_digest("sha256", SHA256_PASSWORD),
}
HEADER = ["username", "roles", "password", "password_hash", "hash_scheme"]
ROWS = [
    ["alice", "reader;clerk", PLAIN_STRONG, "", ""],
    ["bob", "reader", PLAIN_WEAK, "", ""],
    ["carol", "admin", "", LEGACY["md5"].upper(), "md5"],  # legacy exports vary in case
    ["dave", "reader", "", LEGACY["sha1"], "sha1"],
    ["erin", "", "", LEGACY["sha256"], "SHA256"],
]
LOGINS = {
    "alice": (PLAIN_STRONG, "argon2id"),
    "bob": (PLAIN_WEAK, "argon2id"),
    "carol": (MD5_PASSWORD, "argon2id+md5"),
    "dave": (SHA1_PASSWORD, "argon2id+sha1"),
    "erin": (SHA256_PASSWORD, "argon2id+sha256"),
}
IN_CSV = [PLAIN_STRONG, PLAIN_WEAK, *LEGACY.values()]
SECRETS = [*IN_CSV, MD5_PASSWORD, SHA1_PASSWORD, SHA256_PASSWORD]


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def all_bytes(root: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file())


def test_imported_users_log_in_with_their_old_passwords(tmp_path, store, passwords):
    """Plaintext, md5, sha1 and sha256 rows all import; each logs in with its old password."""
    source = write_csv(tmp_path / "legacy.csv", ROWS)
    report = manage.import_users(store, passwords, source)
    assert report == {
        "imported": 5,
        "usernames": ["alice", "bob", "carol", "dave", "erin"],
        "schemes": {"argon2id": 2, "argon2id+md5": 1, "argon2id+sha1": 1, "argon2id+sha256": 1},
        "weak": 1,
        "source_purged": True,
    }
    for username, (password, scheme) in LOGINS.items():
        user = store.get_user(username)
        assert user.hash_scheme == scheme
        assert user.password_hash.startswith("$argon2id$")
        ok, upgrade = passwords.check(user.hash_scheme, user.password_hash, password)
        assert ok, username
        assert upgrade == (scheme != "argon2id"), username
        assert passwords.check(user.hash_scheme, user.password_hash, password + "!") == (
            False,
            False,
        )
    assert store.get_user("alice").roles == ("reader", "clerk")
    assert store.get_user("erin").roles == ()


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        (["-frank", "reader", "Frank-Password-123", "", ""], "username"),
        (["frank", "Reader", "Frank-Password-123", "", ""], "role 'Reader'"),
        (["frank", "reader", "", "", ""], "exactly one of password and password_hash"),
        (["frank", "reader", "Frank-Password-123", LEGACY["md5"], "md5"], "exactly one of"),
        (["frank", "reader", "", LEGACY["md5"], "md4"], "hash_scheme must be one of"),
        (["frank", "reader", "", LEGACY["md5"], ""], "hash_scheme must be one of"),
        (["frank", "reader", "", LEGACY["sha1"], "md5"], "32-character hex md5"),
        (["frank", "reader", "", "z" * 32, "md5"], "32-character hex md5"),
        (["ALICE", "reader", "Frank-Password-123", "", ""], "username repeats line 2"),
        (["frank", "reader", "Frank-Password-123", "", "", "extra"], "more fields"),
    ],
    ids=[
        "bad-username", "bad-role", "no-password", "both", "unknown-scheme", "no-scheme",
        "wrong-length", "not-hex", "duplicate-any-case", "extra-field",
    ],
)  # fmt: skip
def test_one_bad_row_imports_nothing_and_names_its_line(
    tmp_path, store, passwords, bad_row, problem
):
    """A bad fourth line refuses the whole file: its line number and problem, no password."""
    rows = [ROWS[0], ROWS[2], bad_row, ROWS[3]]
    source = write_csv(tmp_path / "legacy.csv", rows)
    with pytest.raises(ValueError, match=problem) as caught:
        manage.import_users(store, passwords, source)
    message = str(caught.value)
    assert "legacy.csv: line 4: " in message
    for secret in [*SECRETS, "Frank-Password-123"]:
        assert secret not in message
    assert store.list_users() == []
    assert source.exists(), "a refused file is left for the operator to fix"


def test_a_user_that_already_exists_refuses_the_file(tmp_path, store, passwords):
    """An existing account (any case) is a bad row: nothing imported, the line named."""
    manage.add_user(store, passwords, "Dave", "Existing-Password-1", ["reader"])
    source = write_csv(tmp_path / "legacy.csv", ROWS)
    with pytest.raises(ValueError, match="line 5: user already exists: dave"):
        manage.import_users(store, passwords, source)
    assert [u.username for u in store.list_users()] == ["Dave"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"username,roles\nalice,reader\n", "line 1: need columns"),
        (
            b"username,roles,password,pasword\nalice,reader,x,y\n",
            "line 1: unknown column 'pasword'",
        ),
        (b"username,roles,password\n", "no rows to import"),
        (b"username,roles,password\nalice,reader,\xff\xfeOkapi\n", "not UTF-8 text"),
    ],
    ids=["no-password-column", "typo-column", "empty", "not-utf8"],
)
def test_unusable_files_are_refused_whole(tmp_path, store, passwords, content, problem):
    """A file without the needed columns, with a typo, without rows or not UTF-8 is refused."""
    source = tmp_path / "legacy.csv"
    source.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as caught:
        manage.import_users(store, passwords, source)
    assert "Okapi" not in str(caught.value)
    assert store.list_users() == []


def test_legacy_plaintext_is_purged_from_every_file_and_log(tmp_path, passwords, capsys, caplog):
    """After an import no planted password or legacy digest is in any file or any log line."""
    source = write_csv(tmp_path / "legacy.csv", ROWS)
    planted = [secret.encode() for secret in SECRETS]
    before = all_bytes(tmp_path)
    for secret in IN_CSV:
        assert secret.encode() in before or secret.upper().encode() in before, "the scan works"
    db_path = tmp_path / "var" / "identity.duckdb"
    with capture_logs() as logs, caplog.at_level(logging.DEBUG):
        with AccountStore.open(db_path) as store:
            manage.import_users(store, passwords, source)
            while_open = all_bytes(tmp_path)
        after = all_bytes(tmp_path)
    assert not source.exists()
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["identity.duckdb"], "no WAL, no temp file, no CSV left"
    assert b"alice" in after, "the scan does read the store's bytes"
    captured = capsys.readouterr()
    logged = captured.out + captured.err + caplog.text + repr(logs)
    assert "identity.users_imported" in logged, "the import was logged, without secrets"
    for secret in planted:
        for haystack in (while_open, after, logged.encode()):
            assert secret not in haystack
            assert secret.upper() not in haystack


def test_the_byte_scan_would_see_a_password_that_reached_duckdb(tmp_path):
    """The control for the purge test: a string stored in the store is visible to the scan."""
    with AccountStore.open(tmp_path / "identity.duckdb") as store:
        store.add_users([NewUser("leaky", PLAIN_STRONG, "argon2id", ())])  # a bug, on purpose
        store.checkpoint()
    assert PLAIN_STRONG.encode() in all_bytes(tmp_path)


def test_keep_source_leaves_the_file_untouched(tmp_path, store, passwords):
    """With purge_source=False the CSV stays byte for byte; the users are imported all the same."""
    source = write_csv(tmp_path / "legacy.csv", ROWS)
    original = source.read_bytes()
    report = manage.import_users(store, passwords, source, purge_source=False)
    assert report["source_purged"] is False
    assert source.read_bytes() == original
    assert len(store.list_users()) == 5


# The CLI, end to end


def to_toml(table: dict[str, Any], name: str = "") -> str:
    """Enough TOML for the gateway config: scalars, string lists, tables, arrays of tables."""
    lines = [f"[{name}]"] if name else []
    nested = []
    for key, value in table.items():
        child = f"{name}.{key}" if name else key
        if isinstance(value, dict):
            nested.append(to_toml(value, child))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            nested.extend(
                to_toml(item, child).replace(f"[{child}]", f"[[{child}]]", 1) for item in value
            )
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join([*lines, *nested]) + "\n"


@dataclass
class Cli:
    """`python -m gateway --config <config>` in a subprocess; var holds every file it writes."""

    config: Path
    var: Path

    def __call__(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
        return subprocess.run(
            [*GATEWAY, "--config", str(self.config), *args],
            input=stdin, capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
        )  # fmt: skip


@pytest.fixture
def cli(tmp_path) -> Cli:
    """config/gateway.toml copied with identity and audit files pointed into tmp_path/var."""
    raw = tomllib.loads((REPO / "config" / "gateway.toml").read_text(encoding="utf-8"))
    var = tmp_path / "var"
    raw.setdefault("audit", {}).update(
        jsonl_path=str(var / "audit.jsonl"), db_path=str(var / "audit.duckdb")
    )
    identity = raw.setdefault("identity", {})
    identity["db_path"] = str(var / "identity.duckdb")
    identity.setdefault("passwords", {}).update(time_cost=1, memory_kib=64, parallelism=1)
    config = tmp_path / "gateway.toml"
    config.write_text(to_toml(raw), encoding="utf-8")
    return Cli(config, var)


def audit_events(var: Path) -> list[dict[str, Any]]:
    path = var / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_cli_adds_lists_and_audits_a_user_without_the_password(cli, passwords):
    """`users add --password-stdin` stores the user; list shows it; the audit line has no secret."""
    password = "Cli-Wombat-Trellis-6168"
    added = cli("users", "add", "Alice", "--role", "reader", "--role", "clerk",
                "--password-stdin", stdin=password + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added user Alice with roles reader, clerk" in added.stdout

    listed = cli("users", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [user] = json.loads(listed.stdout)
    assert (user["username"], user["roles"], user["status"]) == (
        "Alice",
        ["reader", "clerk"],
        "active",
    )
    table = cli("users", "list").stdout.splitlines()
    assert table[0].split() == ["username", "status", "mfa_state", "roles"]
    assert table[1].split() == ["Alice", "active", "none", "reader,clerk"]

    [event] = audit_events(cli.var)
    assert event["kind"] == "account.user_added"
    assert event["subject"] == getpass.getuser()
    assert event["detail"] == {"username": "Alice", "roles": ["reader", "clerk"]}
    assert list((cli.var / "audit-inbox").glob("*.ndjson")), "the row waits for the gateway"
    outputs = added.stdout + added.stderr + listed.stdout + listed.stderr
    assert password not in outputs
    assert password.encode() not in all_bytes(cli.var)

    with AccountStore.open(cli.var / "identity.duckdb") as store:
        stored = store.get_user("alice")
    assert passwords.check(stored.hash_scheme, stored.password_hash, password) == (True, False)


def test_cli_refuses_a_weak_password_without_echoing_it(cli):
    """A too-short password exits 2 with the rule named, nothing stored, nothing audited."""
    refused = cli("users", "add", "bob", "--role", "reader", "--password-stdin", stdin="Tiny-Pw9\n")
    assert refused.returncode == 2
    assert "at least 12 characters" in refused.stderr
    assert "Tiny-Pw9" not in refused.stdout + refused.stderr
    assert json.loads(cli("users", "list", "--json").stdout) == []
    assert audit_events(cli.var) == []


def test_cli_role_and_status_changes_are_audited(cli):
    """set-roles, disable and enable each change the account and write their audit event."""
    cli(
        "users",
        "add",
        "carol",
        "--role",
        "reader",
        "--password-stdin",
        stdin="Carol-Password-0001\n",
    )
    assert cli("users", "set-roles", "CAROL", "--role", "admin").returncode == 0
    assert cli("users", "disable", "carol").returncode == 0
    [user] = json.loads(cli("users", "list", "--json").stdout)
    assert (user["roles"], user["status"]) == (["admin"], "disabled")
    assert cli("users", "enable", "carol").returncode == 0
    missing = cli("users", "disable", "ghost")
    assert missing.returncode == 2
    assert "no user 'ghost'" in missing.stderr
    kinds = [(e["kind"], e["detail"]["roles"]) for e in audit_events(cli.var)]
    assert kinds == [
        ("account.user_added", ["reader"]),
        ("account.roles_changed", ["admin"]),
        ("account.user_disabled", ["admin"]),
        ("account.user_enabled", ["admin"]),
    ]


def printed_secret(stdout: str) -> str:
    [secret] = [
        line.removeprefix("client_secret: ")
        for line in stdout.splitlines()
        if line.startswith("client_secret: ")
    ]
    return secret


def test_cli_client_secret_is_shown_once_and_never_stored(cli, passwords):
    """`clients add` prints the secret once with a warning; only its hash is kept or audited."""
    added = cli("clients", "add", "ingest-1", "--role", "ingest")
    assert added.returncode == 0, added.stderr
    assert "shown only once" in added.stdout
    secret = printed_secret(added.stdout)
    rotated = cli("clients", "rotate-secret", "ingest-1")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = printed_secret(rotated.stdout)
    listed = cli("clients", "list", "--json")
    assert [c["client_id"] for c in json.loads(listed.stdout)] == ["ingest-1"]

    for value in (secret, new_secret):
        assert value not in listed.stdout + listed.stderr + added.stderr + rotated.stderr
        assert value.encode() not in all_bytes(cli.var), "not in the store, WAL or audit"
    events = audit_events(cli.var)
    assert [e["kind"] for e in events] == ["account.client_added", "account.client_secret_rotated"]
    assert events[0]["detail"] == {"client_id": "ingest-1", "roles": ["ingest"]}

    with AccountStore.open(cli.var / "identity.duckdb") as store:
        assert manage.verify_client(store, passwords, "ingest-1", secret) is None
        assert manage.verify_client(store, passwords, "ingest-1", new_secret) is not None


def test_cli_import_destroys_the_source_unless_kept(cli, tmp_path):
    """`users import` destroys the CSV by default, keeps it with --keep-source, audits both."""
    kept = write_csv(tmp_path / "kept.csv", ROWS[:2])
    result = cli("users", "import", str(kept), "--keep-source")
    assert result.returncode == 0, result.stderr
    assert "imported 2 users (2 argon2id)" in result.stdout
    assert "1 imported passwords break today's rules" in result.stdout
    assert kept.exists()
    purged = write_csv(tmp_path / "purged.csv", ROWS[2:])
    result = cli("users", "import", str(purged))
    assert result.returncode == 0, result.stderr
    assert not purged.exists()
    events = audit_events(cli.var)
    assert [(e["kind"], e["detail"]["count"], e["detail"]["source_purged"]) for e in events] == [
        ("account.users_imported", 2, False),
        ("account.users_imported", 3, True),
    ]
    audit_text = (cli.var / "audit.jsonl").read_text()
    for secret in SECRETS:
        assert secret not in audit_text
        assert secret not in result.stdout + result.stderr


def test_cli_warns_about_a_role_the_policy_does_not_define(cli):
    """A role is policy data: one not in data.rbac.roles is accepted but flagged as granting nothing."""
    made = cli("users", "add", "erin", "--role", "auditor", "--password-stdin",
               stdin="erin's long password\n")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "'auditor' is not defined" in made.stderr
    known = cli("users", "add", "fay", "--role", "reader", "--password-stdin",
                stdin="fay's long password!\n")  # fmt: skip
    assert known.returncode == 0
    assert "warning" not in known.stderr


def test_cli_exits_3_while_the_gateway_holds_the_store(cli):
    """With the store held open elsewhere, account commands exit 3 and say who holds it."""
    with AccountStore.open(cli.var / "identity.duckdb"):
        held = cli("users", "list")
    assert held.returncode == 3
    assert "locked by another process" in held.stderr
    assert "Traceback" not in held.stderr
    assert cli("users", "list").returncode == 0
