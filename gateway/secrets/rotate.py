"""Rotating the upstream shared secret with no downtime (`gateway secrets rotate`).

The steps, each safe to stop after (upstream/trust.py reads the same files):

1. write the new secret to ``upstream.secret.next``: the EMP service accepts it beside the
   current one (it looks at the files once a second);
2. wait until the service accepts the new secret (a probe that would be refused otherwise);
3. write the old secret to ``upstream.secret.previous`` with a deadline (now + overlap), then
   replace ``upstream.secret`` with the new one and remove ``.next``: every gateway switches
   within a second, and the service keeps accepting the old secret until the deadline, for
   requests already on their way and for replicas not yet switched.

If the service never accepts the new secret, ``.next`` is removed and nothing else changed.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.keys import read_secret, write_private

if TYPE_CHECKING:
    from pathlib import Path

SECRET_HEADER = "X-Gateway-Secret"  # noqa: S105  # nosec B105  # a header name
# A path no route serves: the trust check answers it first (401 untrusted, else 404).
PROBE_PATH = "/_gateway/trust-probe"


class RotationError(RuntimeError):
    """The rotation could not complete; nothing was switched."""


@dataclass(frozen=True)
class UpstreamRotation:
    """What a rotation of the upstream secret does (or did): files and the overlap."""

    secret_file: Path
    overlap_seconds: float
    accept_until: float
    upstream_reachable: bool

    def public(self) -> dict[str, Any]:
        """The audit detail and the printed summary: paths and times, never a value."""
        return {
            "name": "upstream_secret",
            "secret_file": str(self.secret_file),
            "next_file": str(next_path(self.secret_file)),
            "previous_file": str(previous_path(self.secret_file)),
            "overlap_seconds": self.overlap_seconds,
            "old_accepted_until": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.accept_until)
            ),
            "upstream_reachable": self.upstream_reachable,
        }


def next_path(path: Path) -> Path:
    """Where a secret being introduced waits (accepted by the service, not yet sent)."""
    return path.with_name(path.name + ".next")


def previous_path(path: Path) -> Path:
    """Where the replaced secret stays accepted until its deadline."""
    return path.with_name(path.name + ".previous")


def probe(upstream_url: str, secret: str, *, timeout: float = 2.0) -> bool | None:
    """Whether the service accepts `secret`: True/False, None when it cannot be reached."""
    request = urllib.request.Request(  # noqa: S310 - the configured upstream URL (http/https)
        upstream_url.rstrip("/") + PROBE_PATH,
        headers={SECRET_HEADER: secret, "X-Gateway-Subject": "gateway:rotation"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310  # nosec B310
            return True
    except urllib.error.HTTPError as answer:
        return answer.code != 401  # noqa: PLR2004 - 401 is the trust check's refusal
    except (urllib.error.URLError, OSError):
        return None


def rotate_upstream_secret(
    secret_file: Path,
    upstream_url: str,
    *,
    overlap_seconds: float,
    wait_seconds: float,
    dry_run: bool,
) -> UpstreamRotation:
    """Introduce a new secret, wait for the service to accept it, then switch (see above)."""
    current = read_secret(secret_file)
    reachable = probe(upstream_url, current)
    if reachable is False:
        raise RotationError(
            f"the EMP service at {upstream_url} refuses the current secret: fix that first"
        )
    plan = UpstreamRotation(
        secret_file, overlap_seconds, time.time() + overlap_seconds, reachable is True
    )
    if dry_run:
        return plan
    new = secrets.token_urlsafe(32)
    introduced = next_path(secret_file)
    write_private(introduced, new + "\n")
    if reachable:
        deadline = time.monotonic() + wait_seconds
        while probe(upstream_url, new) is not True:
            if time.monotonic() >= deadline:
                introduced.unlink(missing_ok=True)
                raise RotationError(
                    f"the EMP service did not accept the new secret within {wait_seconds:g} s "
                    f"(does it read {introduced}?); nothing was switched"
                )
            time.sleep(0.2)
    accept_until = time.time() + overlap_seconds
    old = {"secret": current, "accept_until": accept_until}
    write_private(previous_path(secret_file), json.dumps(old) + "\n")
    write_private(secret_file, new + "\n")
    introduced.unlink(missing_ok=True)
    return UpstreamRotation(secret_file, overlap_seconds, accept_until, reachable is True)
