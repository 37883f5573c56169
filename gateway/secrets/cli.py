"""`gateway secrets check` and `gateway secrets rotate`.

check: every secret the gateway holds, its age against its limit. Exit status 0 when every
secret is within its limit (some may be due soon), 1 when any is overdue, expiring, expired,
missing or unreadable (a cron job or CI gate acts on it), 2 on a bad configuration.

rotate: what can be rotated with no downtime: the signing key (the key ring's overlap), the
upstream secret (accepted beside the old one, which stays accepted for --overlap-seconds) and
the audit store's data keys (a new current key, then every stored value re-encrypted under it).
Every rotation, and every dry run, leaves an audit event. Values are never printed.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from empsecrets.providers import Keystore
from gateway.audit import record_offline, system_event
from gateway.logs import register_secret
from gateway.secrets.inventory import as_json, inventory, render
from gateway.secrets.rotate import (
    DATA_KEY_NAME,
    EMP_DATA_KEY_NAME,
    RotationError,
    rotate_data_keys,
    rotate_emp_data_keys,
    rotate_upstream_secret,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from gateway.config import GatewayConfig


def register(sub: Any) -> None:
    """Add the `secrets` command group to the gateway's parser."""
    group = sub.add_parser("secrets", help="secrets: ages against their limits").add_subparsers(
        dest="what", required=True
    )
    check = group.add_parser(
        "check", help="list every secret with its age and limit; exit 1 when any is past it"
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(func=cmd_secrets_check)
    rotate = group.add_parser(
        "rotate",
        help="rotate a secret with no downtime (signing_key, upstream_secret,"
        f" {DATA_KEY_NAME}, {EMP_DATA_KEY_NAME})",
    )
    rotate.add_argument("name", help="a name `secrets check` lists")
    rotate.add_argument(
        "--dry-run", action="store_true", help="say what would happen; change nothing"
    )
    rotate.add_argument(
        "--overlap-seconds", type=float, default=300.0,
        help="upstream_secret: how long the old secret stays accepted (default 300)",
    )  # fmt: skip
    rotate.add_argument(
        "--wait-seconds", type=float, default=10.0,
        help="upstream_secret: how long to wait for the EMP service to accept the new one",
    )  # fmt: skip
    rotate.add_argument(
        "--batch-size", type=int, default=2000,
        help=f"{DATA_KEY_NAME}: rows re-encrypted per transaction with the gateway stopped "
        "(default 2000, as a running gateway does)",
    )  # fmt: skip
    rotate.set_defaults(func=cmd_secrets_rotate)
    _register_keystore(group)


def _register_keystore(group: Any) -> None:
    keystore = group.add_parser(
        "keystore", help="the encrypted local keystore (keystore:NAME references)"
    ).add_subparsers(dest="keystore_what", required=True)
    init = keystore.add_parser("init", help="create the keystore (and its master key if missing)")
    init.set_defaults(func=cmd_keystore_init)
    put = keystore.add_parser(
        "put", help="store a secret under NAME (a new version), read from stdin, never echoed"
    )
    put.add_argument("name")
    put.set_defaults(func=cmd_keystore_put)
    listing = keystore.add_parser("list", help="names, versions and dates; never values")
    listing.set_defaults(func=cmd_keystore_list)
    delete = keystore.add_parser("delete", help="remove NAME and its value")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_keystore_delete)
    master = keystore.add_parser(
        "rotate-master", help="re-encrypt every entry under a new master key"
    )
    master.set_defaults(func=cmd_keystore_rotate_master)


def cmd_secrets_check(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Print the inventory; 1 when any secret needs attention now."""
    states = inventory(config)
    print(as_json(states) if args.json else render(states))  # noqa: T201
    return 1 if any(state.failing for state in states) else 0


# How to rotate what `secrets rotate` does not: printed instead of a half-done rotation.
_ELSEWHERE = {
    "client_secret": "rotate a client's secret with `gateway clients rotate-secret CLIENT_ID`",
    "certificate": "renew the certificate and restart the gateway (docs/security/tls.md)",
}


def cmd_secrets_rotate(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Rotate one secret (or show the plan), audited; 2 for a secret rotated elsewhere."""
    name: str = args.name
    rotate = _ROTATIONS.get(name)
    if rotate is not None:
        return rotate(config, args)
    known = {state.name: state.kind for state in inventory(config)}
    if name not in known:
        print(f"gateway: no secret named {name!r}; `gateway secrets check` lists them",  # noqa: T201
              file=sys.stderr)  # fmt: skip
        return 2
    how = _ELSEWHERE.get(known[name], "see docs/security/secrets.md#rotation for its steps")
    print(f"gateway: {name} is not rotated by this command: {how}", file=sys.stderr)  # noqa: T201
    return 2


def _rotate_signing_key(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.cli import cmd_keys_rotate  # noqa: PLC0415 - the same path as `keys rotate`

    return cmd_keys_rotate(config, args)


def _rotate_upstream_secret(config: GatewayConfig, args: argparse.Namespace) -> int:
    subject = getpass.getuser()
    try:
        rotation = rotate_upstream_secret(
            config.upstream.secret_file,
            config.upstream.url,
            overlap_seconds=args.overlap_seconds,
            wait_seconds=args.wait_seconds,
            dry_run=args.dry_run,
        )
    except RotationError as exc:
        _audit(config, "secrets.rotation_failed", subject, name="upstream_secret", error=str(exc))
        print(f"gateway: rotation failed: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    summary = rotation.public()
    kind = "secrets.rotation_planned" if args.dry_run else "secrets.rotated"
    _audit(config, kind, subject, **summary)
    print(json.dumps({"dry_run": args.dry_run, **summary}, indent=2))  # noqa: T201
    return 0


def _rotate_data_keys(config: GatewayConfig, args: argparse.Namespace) -> int:
    """A new current data key, then every audit value re-encrypted under it (audited)."""
    if args.batch_size < 1:
        print("gateway: --batch-size must be at least 1", file=sys.stderr)  # noqa: T201
        return 2
    subject = getpass.getuser()
    try:
        rotation = rotate_data_keys(config, dry_run=args.dry_run, batch_size=args.batch_size)
    except RotationError as exc:
        _audit(config, "secrets.rotation_failed", subject, name=DATA_KEY_NAME, error=str(exc))
        print(f"gateway: rotation failed: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    summary = rotation.public()
    _audit(config, "secrets.rotation_planned" if args.dry_run else "secrets.rotated", subject,
           **summary)  # fmt: skip
    print(json.dumps({"dry_run": args.dry_run, **summary}, indent=2))  # noqa: T201
    return 0


def _rotate_emp_data_keys(config: GatewayConfig, args: argparse.Namespace) -> int:
    """The EMP service adds a data key and reseals its database under it (audited)."""
    subject = getpass.getuser()
    try:
        summary = rotate_emp_data_keys(config, dry_run=args.dry_run)
    except RotationError as exc:
        _audit(config, "secrets.rotation_failed", subject, name=EMP_DATA_KEY_NAME, error=str(exc))
        print(f"gateway: rotation failed: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    _audit(config, "secrets.rotation_planned" if args.dry_run else "secrets.rotated", subject,
           **summary)  # fmt: skip
    print(json.dumps({"dry_run": args.dry_run, **summary}, indent=2))  # noqa: T201
    return 0


_ROTATIONS: dict[str, Callable[[GatewayConfig, argparse.Namespace], int]] = {
    "signing_key": _rotate_signing_key,
    "upstream_secret": _rotate_upstream_secret,
    DATA_KEY_NAME: _rotate_data_keys,
    EMP_DATA_KEY_NAME: _rotate_emp_data_keys,
}


def _audit(config: GatewayConfig, kind: str, subject: str, **detail: Any) -> None:
    event = system_event(kind, subject=subject, **detail)
    record_offline(config.audit.jsonl_path, config.audit.db_path, event)


def _open_keystore(config: GatewayConfig) -> Keystore:
    return Keystore.open(config.secrets.keystore_file, config.secrets.master_key_file)


def _read_value(name: str) -> str:
    """The secret from a terminal (not echoed) or from a pipe (one line)."""
    if sys.stdin.isatty():
        return getpass.getpass(f"value for {name}: ")
    return sys.stdin.readline().rstrip("\n")


def cmd_keystore_init(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """Create the keystore; its master key too, unless one is already in place."""
    secrets = config.secrets
    store = Keystore.create(secrets.keystore_file, secrets.master_key_file)
    _audit(config, "secrets.keystore_created", getpass.getuser(), keystore=str(store.path))
    print(f"wrote {store.path} (master key {store.master_path})")  # noqa: T201
    return 0


def cmd_keystore_put(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Store a new version of NAME; the value never reaches argv, the output or the audit."""
    value = _read_value(args.name)
    if not value:
        print("gateway: refusing an empty secret", file=sys.stderr)  # noqa: T201
        return 2
    entry = _open_keystore(config).put(args.name, register_secret(value))
    _audit(config, "secrets.keystore_put", getpass.getuser(), name=entry.name,
           version=entry.version)  # fmt: skip
    print(f"keystore:{entry.name} version {entry.version}")  # noqa: T201
    return 0


def cmd_keystore_list(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """One line per entry: reference, version, when it was put."""
    for entry in _open_keystore(config).list():
        print(f"keystore:{entry.name}  version {entry.version}  {entry.created_at.isoformat()}")  # noqa: T201
    return 0


def cmd_keystore_delete(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Remove an entry (audited)."""
    _open_keystore(config).delete(args.name)
    _audit(config, "secrets.keystore_deleted", getpass.getuser(), name=args.name)
    print(f"deleted keystore:{args.name}")  # noqa: T201
    return 0


def cmd_keystore_rotate_master(config: GatewayConfig, _args: argparse.Namespace) -> int:
    """A new random master key; every entry re-encrypted under it (audited)."""
    store = _open_keystore(config)
    store.rotate_master(os.urandom(32))
    _audit(config, "secrets.master_rotated", getpass.getuser(), keystore=str(store.path),
           entries=len(store.list()))  # fmt: skip
    print(f"re-encrypted {store.path} under a new master key ({store.master_path})")  # noqa: T201
    return 0
