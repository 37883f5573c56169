"""`gateway secrets check`: every secret the gateway holds, its age against its limit.

Exit status: 0 when every secret is within its limit (some may be due soon), 1 when any is
overdue, expiring, expired, missing or unreadable (a cron job or CI gate acts on it), 2 on a bad
configuration. Values are never read or printed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.secrets.inventory import as_json, inventory, render

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


def cmd_secrets_check(config: GatewayConfig, args: argparse.Namespace) -> int:
    """Print the inventory; 1 when any secret needs attention now."""
    states = inventory(config)
    print(as_json(states) if args.json else render(states))  # noqa: T201
    return 1 if any(state.failing for state in states) else 0
