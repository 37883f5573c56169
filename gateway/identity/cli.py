"""The `gateway users` and `gateway clients` commands: accounts of the built-in identity provider.

Each runs one operation of manage.py on the store file and audits every change. Prints a new
client secret once; never a password or a hash.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gateway.audit import record_offline, system_event
from gateway.identity import manage
from gateway.identity.accounts import AccountStore, StoreLocked
from gateway.identity.passwords import Passwords, validate_username

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from gateway.config import GatewayConfig
    from gateway.identity.accounts import Status

    Handler = Callable[[GatewayConfig, argparse.Namespace], int]
    StoreHandler = Callable[[GatewayConfig, argparse.Namespace, AccountStore], int]

EXIT_STORE_LOCKED = 3  # the running gateway holds the store; its admin API is the way in


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `users` and `clients` command groups to the gateway's subcommands."""
    _register_users(sub)
    _register_clients(sub)


def _register_users(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = sub.add_parser("users", help="people's accounts").add_subparsers(
        dest="what", required=True
    )
    add = users.add_parser("add", help="create a user; the password is asked for twice")
    add.add_argument("username")
    _add_role_option(add)
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password as one line from stdin (for scripts)")  # fmt: skip
    add.set_defaults(func=cmd_users_add)

    set_roles = users.add_parser("set-roles", help="replace a user's roles")
    set_roles.add_argument("username")
    _add_role_option(set_roles)
    set_roles.set_defaults(func=cmd_users_set_roles)

    for name, handler, text in (
        ("disable", _status_command("user", "disabled"), "stop a user logging in (sessions too)"),
        ("enable", _status_command("user", "active"), "let a disabled user log in again"),
    ):
        status = users.add_parser(name, help=text)
        status.add_argument("username")
        status.set_defaults(func=handler)

    password = users.add_parser("set-password", help="replace a user's password (asked twice)")
    password.add_argument("username")
    password.add_argument(
        "--password-stdin", action="store_true", help="read it as one line from stdin"
    )
    password.set_defaults(func=cmd_users_set_password)

    reset = users.add_parser("reset-mfa", help="turn a user's MFA off (lost device and codes)")
    reset.add_argument("username")
    reset.set_defaults(func=cmd_users_reset_mfa)

    listing = users.add_parser("list", help="every user, without hashes")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_users_list)

    load = users.add_parser("import", help="import legacy users from CSV, then destroy the file")
    load.add_argument("file", type=Path, metavar="FILE.csv")
    load.add_argument("--keep-source", action="store_true",
                      help="leave the CSV (it holds passwords or hashes) in place")  # fmt: skip
    load.set_defaults(func=cmd_users_import)


def _register_clients(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    clients = sub.add_parser("clients", help="service clients (ingest processes)").add_subparsers(
        dest="what", required=True
    )
    add = clients.add_parser("add", help="create a client and print its secret, once")
    add.add_argument("client_id")
    _add_role_option(add)
    add.set_defaults(func=cmd_clients_add)

    rotate = clients.add_parser("rotate-secret", help="replace a client's secret; print it once")
    rotate.add_argument("client_id")
    rotate.set_defaults(func=cmd_clients_rotate_secret)

    for name, handler, text in (
        ("disable", _status_command("client", "disabled"), "refuse the client new tokens"),
        ("enable", _status_command("client", "active"), "let a disabled client get tokens again"),
    ):
        status = clients.add_parser(name, help=text)
        status.add_argument("client_id")
        status.set_defaults(func=handler)

    listing = clients.add_parser("list", help="every client, without secrets")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_clients_list)


def _add_role_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", action="append", required=True, metavar="ROLE",
                        help="a role; repeat for several")  # fmt: skip


def _store_command(handler: StoreHandler) -> Handler:
    """Run handler on the open store; a store held by another process is exit 3, not a trace."""

    @functools.wraps(handler)
    def run(config: GatewayConfig, args: argparse.Namespace) -> int:
        try:
            with AccountStore.open_waiting(config.identity.db_path) as store:
                return handler(config, args, store)
        except StoreLocked as exc:
            sys.stderr.write(f"gateway: {exc}\n")
            return EXIT_STORE_LOCKED

    return run


def cmd_users_add(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Create a user with a password from the terminal (twice) or one line of stdin."""
    validate_username(args.username)  # before asking for a password that would go nowhere
    password = _read_new_password(from_stdin=args.password_stdin)  # before locking the store
    return _store_command(functools.partial(_add_user, password=password))(config, args)


def _add_user(
    config: GatewayConfig, args: argparse.Namespace, store: AccountStore, *, password: str
) -> int:
    _warn_unknown_roles(config, args.role)
    user = manage.add_user(store, _passwords(config), args.username, password, args.role)
    _audit(config, "account.user_added", username=user["username"], roles=user["roles"])
    _say(f"added user {user['username']} with roles {', '.join(user['roles'])}")
    return 0


def cmd_users_set_password(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Replace a user's password (checked against the rules; hashed before the store opens)."""
    password = _read_new_password(from_stdin=args.password_stdin)
    password_hash = manage.new_password_hash(_passwords(config), args.username, password)

    def store_it(config: GatewayConfig, args: argparse.Namespace, store: AccountStore) -> int:
        user = manage.set_password_hash(store, args.username, password_hash)
        _audit(config, "account.password_changed", username=user["username"])
        _say(f"password of {user['username']} changed")
        return 0

    return _store_command(store_it)(config, args)


@_store_command
def cmd_users_reset_mfa(
    config: GatewayConfig, args: argparse.Namespace, store: AccountStore
) -> int:
    """Turn a user's MFA off; their next login enrols again (or is restricted when enforced)."""
    user = manage.reset_mfa(store, args.username)
    _audit(config, "account.mfa_reset", username=user["username"])
    _say(f"MFA of {user['username']} is off; they can enrol again (POST /auth/mfa/enroll)")
    return 0


def _status_command(kind: Literal["user", "client"], status: Status) -> Handler:
    """`users disable|enable` and `clients disable|enable`: set the status, audit, say so."""
    verb = "disabled" if status == "disabled" else "enabled"

    def run(config: GatewayConfig, args: argparse.Namespace, store: AccountStore) -> int:
        if kind == "user":
            account = manage.set_user_status(store, args.username, status)
            name, detail = account["username"], {"username": account["username"]}
            detail["roles"] = account["roles"]
        else:
            account = manage.set_client_status(store, args.client_id, status)
            name, detail = account["client_id"], {"client_id": account["client_id"]}
        _audit(config, f"account.{kind}_{verb}", **detail)
        _say(f"{kind} {name} is {status}")
        return 0

    return _store_command(run)


@_store_command
def cmd_users_set_roles(
    config: GatewayConfig, args: argparse.Namespace, store: AccountStore
) -> int:
    """Replace a user's roles."""
    _warn_unknown_roles(config, args.role)
    user = manage.set_roles(store, args.username, args.role)
    _audit(config, "account.roles_changed", username=user["username"], roles=user["roles"])
    _say(f"user {user['username']} now has roles {', '.join(user['roles'])}")
    return 0


@_store_command
def cmd_users_list(_config: GatewayConfig, args: argparse.Namespace, store: AccountStore) -> int:
    """Print every user: a table, or JSON with --json."""
    users = manage.list_users(store)
    columns = ("username", "status", "mfa_state", "roles")
    _print_listing(users, columns, as_json=args.json)
    return 0


def cmd_users_import(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Import a legacy CSV (all rows or none) and destroy it unless --keep-source."""
    source: Path = args.file
    # Hash first (seconds for many rows), then hold the store only to write: logins go on.
    prepared = manage.prepare_import(_passwords(config), source)
    return _store_command(functools.partial(_commit_import, prepared=prepared))(config, args)


def _commit_import(
    config: GatewayConfig,
    args: argparse.Namespace,
    store: AccountStore,
    *,
    prepared: manage.PreparedImport,
) -> int:
    source: Path = args.file
    report = manage.commit_import(store, prepared, source, purge_source=not args.keep_source)
    _audit(config, "account.users_imported", source=str(source), count=report["imported"],
           usernames=report["usernames"], schemes=report["schemes"], weak=report["weak"],
           source_purged=report["source_purged"])  # fmt: skip
    schemes = ", ".join(f"{count} {name}" for name, count in report["schemes"].items())
    _say(f"imported {report['imported']} users ({schemes})")
    if report["weak"]:
        _say(f"{report['weak']} imported passwords break today's rules; have them changed")
    if report["source_purged"]:
        _say(f"overwrote and deleted {source}")
        return 0
    if args.keep_source:
        _say(f"kept {source}: it holds passwords or weak hashes; destroy it when done")
        return 0
    sys.stderr.write(f"gateway: could not destroy {report['purge_error']}\n")
    return 1


@_store_command
def cmd_clients_add(config: GatewayConfig, args: argparse.Namespace, store: AccountStore) -> int:
    """Create a client and print its secret, which is stored only as a hash."""
    _warn_unknown_roles(config, args.role)
    client, secret = manage.add_client(store, _passwords(config), args.client_id, args.role)
    _audit(config, "account.client_added", client_id=client["client_id"], roles=client["roles"])
    _say(f"added client {client['client_id']} with roles {', '.join(client['roles'])}")
    _print_secret(secret)
    return 0


@_store_command
def cmd_clients_rotate_secret(
    config: GatewayConfig, args: argparse.Namespace, store: AccountStore
) -> int:
    """Give a client a new secret; the old one stops working at once."""
    client, secret = manage.rotate_client_secret(store, _passwords(config), args.client_id)
    _audit(config, "account.client_secret_rotated", client_id=client["client_id"],
           roles=client["roles"])  # fmt: skip
    _say(f"rotated the secret of client {client['client_id']}; the old one no longer works")
    _print_secret(secret)
    return 0


@_store_command
def cmd_clients_list(_config: GatewayConfig, args: argparse.Namespace, store: AccountStore) -> int:
    """Print every client: a table, or JSON with --json."""
    clients = manage.list_clients(store)
    _print_listing(clients, ("client_id", "status", "rotated_at", "roles"), as_json=args.json)
    return 0


def _passwords(config: GatewayConfig) -> Passwords:
    return Passwords(config.identity.passwords)


def _read_new_password(*, from_stdin: bool) -> str:
    """The new password: one line of stdin, or typed twice at a prompt that does not echo."""
    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat the password: ") != password:
            raise ValueError("the two passwords differ; nothing was changed")
    if not password:
        raise ValueError("no password given; nothing was changed")
    return password


def _operator() -> str:
    """Who ran the command, for the audit trail: the OS user."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def _warn_unknown_roles(config: GatewayConfig, roles: list[str]) -> None:
    """Roles are the policy's data: say so when one is not defined there (it grants nothing)."""
    data_file = config.policy.dir / "data.json"
    try:
        defined = json.loads(data_file.read_text(encoding="utf-8"))["rbac"]["roles"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the gateway's own start-up check reports a broken policy directory
    for role in roles:
        if role not in defined:
            sys.stderr.write(
                f"gateway: warning: role {role!r} is not defined in {data_file} "
                "(data.rbac.roles): it grants nothing until the security team adds it\n"
            )


def _audit(config: GatewayConfig, kind: str, **detail: Any) -> None:
    event = system_event(kind, subject=_operator(), **detail)
    record_offline(config.audit.jsonl_path, config.audit.db_path, event)


def _print_secret(secret: str) -> None:
    _say(f"client_secret: {secret}")
    _say("This secret is shown only once: store it now. It can be rotated, never shown again.")


def _print_listing(rows: list[dict[str, Any]], columns: tuple[str, ...], *, as_json: bool) -> None:
    if as_json:
        _say(json.dumps(rows, indent=2))
        return
    cells = [[_cell(row[column]) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)
    ]
    for line in [list(columns), *cells]:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        _say("  ".join(padded).rstrip())


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _cell(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)
