"""`gateway secrets check` and `gateway secrets rotate`.

check: every secret the gateway holds, its age against its limit. Exit status 0 when every
secret is within its limit (some may be due soon), 1 when any is overdue, expiring, expired,
missing or unreadable (a cron job or CI gate acts on it), 2 on a bad configuration.

rotate: what can be rotated with no downtime: the signing key (the key ring's overlap) and the
upstream secret (accepted beside the old one, which stays accepted for --overlap-seconds).
Every rotation, and every dry run, leaves an audit event. Values are never printed.
"""

from __future__ import annotations

import getpass
import json
import sys
from typing import TYPE_CHECKING, Any

from gateway.audit import record_offline, system_event
from gateway.secrets.inventory import as_json, inventory, render
from gateway.secrets.rotate import RotationError, rotate_upstream_secret

if TYPE_CHECKING:
    import argparse

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
        "rotate", help="rotate a secret with no downtime (signing_key, upstream_secret)"
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
    rotate.set_defaults(func=cmd_secrets_rotate)


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
    if name == "signing_key":
        from gateway.cli import cmd_keys_rotate  # noqa: PLC0415 - the same path as `keys rotate`

        return cmd_keys_rotate(config, args)
    if name != "upstream_secret":
        known = {state.name: state.kind for state in inventory(config)}
        if name not in known:
            print(f"gateway: no secret named {name!r}; `gateway secrets check` lists them",  # noqa: T201
                  file=sys.stderr)  # fmt: skip
            return 2
        how = _ELSEWHERE.get(known[name], "see docs/security/secrets.md#rotation for its steps")
        print(f"gateway: {name} is not rotated by this command: {how}", file=sys.stderr)  # noqa: T201
        return 2
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


def _audit(config: GatewayConfig, kind: str, subject: str, **detail: Any) -> None:
    event = system_event(kind, subject=subject, **detail)
    record_offline(config.audit.jsonl_path, config.audit.db_path, event)
