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

import duckdb

from empsecrets.fieldcrypt import DataKeyError, FieldCipher, resolve_ring, store_ring
from empsecrets.files import write_private
from empsecrets.providers import SecretError
from gateway import auditcrypt
from gateway.audit import open_store
from gateway.auditcrypt import count_stale, reencrypt
from gateway.keys import read_secret

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.config import GatewayConfig

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


# --- the audit store's data keys (`gateway secrets rotate gateway_data_key`) -------------------
#
# 1. add a key to the ring and make it current (the old keys stay: archives made before the
#    rotation are sealed under them), and store the ring where encryption.data_keys points;
# 2. re-encrypt every value of audit.duckdb not under the new key, in batches (plaintext from
#    before encryption included): here when the gateway is stopped, else by the running gateway
#    that holds the store, asked on its admin port (POST /audit/reencrypt), which first
#    re-reads the ring so that new rows are sealed under the new key too.

DATA_KEY_NAME = "gateway_data_key"


@dataclass(frozen=True)
class DataKeyRotation:
    """What a rotation of the audit store's data keys did (or would do): ids and counts."""

    data_keys: str  # the reference, never a key
    previous_key_id: str
    new_key_id: str | None  # None in a dry run: the key is made by the rotation
    keys_in_ring: int
    mode: str  # "offline" (this process opened the store), "online" (the gateway did), "no store"
    reencrypted: dict[str, Any]  # rows, values, plaintext (gateway/auditcrypt.py Reencryption)

    def public(self) -> dict[str, Any]:
        """The audit detail and the printed summary."""
        return {
            "name": DATA_KEY_NAME,
            "data_keys": self.data_keys,
            "previous_key_id": self.previous_key_id,
            "new_key_id": self.new_key_id,
            "keys_in_ring": self.keys_in_ring,
            "mode": self.mode,
            **{k: v for k, v in self.reencrypted.items() if k != "key_id"},
        }


def rotate_data_keys(
    config: GatewayConfig, *, dry_run: bool, batch_size: int = 2000
) -> DataKeyRotation:
    """Rotate the ring and re-encrypt the store (see above); RotationError when it cannot."""
    reference, settings = config.encryption.data_keys, auditcrypt.provider_settings(config)
    try:
        ring = resolve_ring(reference, settings)
    except (SecretError, DataKeyError) as exc:
        raise RotationError(f"the data key ring ({reference}) cannot be read: {exc}") from None
    path, admin = config.audit.db_path, _admin_url(config)
    mode = "no store" if not path.exists() else "online" if _held(path) else "offline"
    if mode == "online":  # reachable, and the store's owner: before anything changes
        planned = _ask_gateway(admin, dry_run=True)
    elif mode == "offline":
        with duckdb.connect(str(path), read_only=True) as connection:
            planned = count_stale(connection, None).public()
    else:
        planned = {"rows": 0, "values": 0, "plaintext": 0}
    if dry_run:
        return DataKeyRotation(reference, ring.current, None, len(ring.keys) + 1, mode, planned)
    new = ring.rotated()
    try:
        store_ring(reference, settings, new)
    except SecretError as exc:
        raise RotationError(str(exc)) from None
    done = planned
    if mode == "online":
        done = _ask_gateway(admin, dry_run=False)
    elif mode == "offline":
        done = _reencrypt_here(path, FieldCipher(new), batch_size)
    return DataKeyRotation(reference, ring.current, new.current, len(new.keys), mode, done)


def _held(path: Path) -> bool:
    """Whether another process (the running gateway) holds the store: DuckDB's file lock."""
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.IOException:
        return True
    return False


def _reencrypt_here(path: Path, cipher: FieldCipher, batch_size: int) -> dict[str, Any]:
    try:
        with open_store(path, None) as store:  # the schema of a store from before encryption too
            done = reencrypt(store, cipher, spool=path.parent, batch_size=batch_size)
        open_store(path, cipher).close()  # such a store is then compacted and marked sealed
    except DataKeyError as exc:
        raise RotationError(
            f"{exc}; the ring has the new key {cipher.ring.current}, and the rows before that one "
            "are re-encrypted: run `gateway audit verify`, then rotate again"
        ) from None
    except duckdb.IOException as exc:
        raise RotationError(
            f"{path}: {exc}; the ring has the new key {cipher.ring.current}: run the rotation "
            "again (the gateway, if it started meanwhile, re-encrypts when asked)"
        ) from None
    return done.public()


# --- the EMP service's data keys (`gateway secrets rotate emp_data_key`) ----------------------
#
# The EMP service owns its ring (upstream [encryption]) and its database: it is asked, with
# the gateway's secret, to add a key and reseal (POST /internal/rekey, docs/upstream.md). A dry
# run asks it to count what a reseal would touch.

EMP_DATA_KEY_NAME = "emp_data_key"
UPSTREAM_REKEY_PATH = "/internal/rekey"


def rotate_emp_data_keys(config: GatewayConfig, *, dry_run: bool) -> dict[str, Any]:
    """The EMP service's answer (keys and counts); RotationError when it cannot be done."""
    body = json.dumps({"rotate": not dry_run, "dry_run": dry_run}).encode()
    request = urllib.request.Request(  # noqa: S310 - the configured upstream URL (http/https)
        config.upstream.url.rstrip("/") + UPSTREAM_REKEY_PATH,
        data=body,
        method="POST",
        headers={
            SECRET_HEADER: read_secret(config.upstream.secret_file),
            "X-Gateway-Subject": "gateway:rotation",
            "Content-Type": "application/json",
        },
    )
    result = _reencryption_report(
        request,
        who="the EMP service",
        key="current_key",
        unreachable=lambda exc: (
            f"the EMP service at {config.upstream.url} could not be asked ({exc}); a stopped"
            " service finishes a cut-short reseal at its next start, but only a running one"
            " can rotate"
        ),
    )
    return {"name": EMP_DATA_KEY_NAME, **result}


def _admin_url(config: GatewayConfig) -> str:
    server = config.server
    return f"http://{server.admin_host}:{server.admin_port}{auditcrypt.REENCRYPT_PATH}"


def _ask_gateway(url: str, *, dry_run: bool) -> dict[str, Any]:
    """POST /audit/reencrypt to the gateway that holds the store; its counts."""
    target = url + ("?dry_run=1" if dry_run else "")
    request = urllib.request.Request(target, data=b"", method="POST")  # noqa: S310 - our admin URL
    body = _reencryption_report(
        request,
        who="the running gateway",
        key="values",
        unreachable=lambda exc: (
            "the audit store is held by another process and the gateway's admin port "
            f"({url}) did not answer ({exc}); stop the gateway and run the rotation again"
        ),
    )
    return {k: body.get(k) for k in ("rows", "values", "plaintext")}


def _reencryption_report(
    request: urllib.request.Request,
    *,
    who: str,
    key: str,
    unreachable: Callable[[Exception], str],
) -> dict[str, Any]:
    """The JSON object a re-encryption answers (it has `key`); RotationError otherwise.

    `unreachable` words the error when nobody answers, and what to do then.
    """
    try:
        # A whole store's re-encryption: as long as it takes (an hour is generous).
        with urllib.request.urlopen(request, timeout=3600) as answer:  # noqa: S310  # nosec B310
            body = json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        raise RotationError(
            f"{who} refused the re-encryption ({refused.code}): {_error(refused)}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RotationError(unreachable(exc)) from None
    if not isinstance(body, dict) or key not in body:
        raise RotationError(f"{who} answered {body!r}, not a re-encryption report")
    return body


def _error(answer: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(answer.read()).get("error"))
    except (ValueError, AttributeError):
        return "no reason given"
