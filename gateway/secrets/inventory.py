"""Every secret the gateway holds, with its age and its limit (`gateway secrets check`, metrics).

Nothing here shows a secret's value: a key read by reference is listed by its reference, and
ages come from the key ring's `created_at`, the account store's `rotated_at`, a certificate's
validity dates, the keystore's date of each version (listed without decrypting), Vault's
`created_time`, and for plain secret files from the file's modification time (written once by
`gateway setup`, rewritten by each rotation; a copy that does not keep modification times
makes a secret look younger than it is). An `env:` secret's age is unknown.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509

if TYPE_CHECKING:
    from pathlib import Path

    from empsecrets.providers import KeystoreEntry
    from gateway.config import GatewayConfig, SecretsConfig
    from gateway.keys import GatewayKey

Status = Literal["ok", "due", "overdue", "expiring", "expired", "missing", "unreadable"]
FAILING: frozenset[str] = frozenset({"overdue", "expiring", "expired", "missing", "unreadable"})
DAY = 86_400.0


@dataclass(frozen=True)
class SecretState:
    """One secret: what it is, where it lives, how old it is, and whether that is too old."""

    name: str  # stable: the metric label and the name in `secrets.limits`
    kind: Literal["signing_key", "shared_secret", "key", "client_secret", "certificate"]
    source: str  # a secret reference, a path or an account-store name; never the value
    status: Status
    age_seconds: float | None
    max_age_seconds: float | None  # None: limited by expiry, not by age (certificates)
    expires_at: float | None = None  # epoch seconds (certificates)
    note: str = ""

    @property
    def failing(self) -> bool:
        """Past its limit, expiring, expired, missing or unreadable: `secrets check` exits 1."""
        return self.status in FAILING

    def public(self) -> dict[str, Any]:
        """The JSON form (`gateway secrets check --json`)."""
        return asdict(self)


def max_age_seconds(config: SecretsConfig, name: str) -> float:
    """The limit for `name`: its own entry, else the longest matching prefix, else the default."""
    best: tuple[int, float] | None = None
    for limit in config.limits:
        if limit.secret == name:
            return limit.max_age_days * DAY
        prefix = limit.secret[:-1] if limit.secret.endswith("*") else None
        if (
            prefix is not None
            and name.startswith(prefix)
            and (best is None or len(prefix) > best[0])
        ):
            best = (len(prefix), limit.max_age_days * DAY)
    return best[1] if best is not None else config.max_age_days * DAY


def _aged(
    config: SecretsConfig,
    name: str,
    kind: Any,
    source: str,
    *,
    created_at: float,
    now: float,
    note: str = "",
) -> SecretState:
    age = max(0.0, now - created_at)
    limit = max_age_seconds(config, name)
    status: Status = "ok"
    if age > limit:
        status = "overdue"
    elif age > limit - config.due_days * DAY:
        status = "due"
    return SecretState(name, kind, source, status, age, limit, note=note)


def _secret_file(
    config: SecretsConfig, name: str, kind: Any, path: Path, now: float, *, source: str = ""
) -> SecretState:
    source = source or str(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return SecretState(name, kind, source, "missing", None, max_age_seconds(config, name))
    except OSError as exc:
        return SecretState(name, kind, source, "unreadable", None, None, note=exc.strerror or "")
    return _aged(config, name, kind, source, created_at=mtime, now=now)


def _signing_keys(config: SecretsConfig, key_dir: Path, now: float) -> SecretState:
    from gateway.keyring import keyring_path, load_keyring  # noqa: PLC0415 - jwcrypto, on use

    source = str(keyring_path(key_dir))
    try:
        keys = load_keyring(key_dir)
    except FileNotFoundError:
        return SecretState("signing_key", "signing_key", source, "missing", None, None)
    except (OSError, ValueError) as exc:
        return SecretState(
            "signing_key", "signing_key", source, "unreadable", None, None, note=str(exc)
        )
    active = keys[0]
    retired = len(keys) - 1
    note = f"kid {active['kid'][:12]}…" + (
        f", {retired} retired kept for verification" if retired else ""
    )
    created_at = active["created_at"]
    return _aged(
        config, "signing_key", "signing_key", source, created_at=created_at, now=now, note=note
    )


def _certificate(config: SecretsConfig, name: str, path: Path, now: float) -> SecretState:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        return SecretState(name, "certificate", str(path), "missing", None, None)
    except (OSError, ValueError) as exc:
        return SecretState(name, "certificate", str(path), "unreadable", None, None, note=str(exc))
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    left = not_after - now
    status: Status = "ok"
    if left <= 0:
        status = "expired"
    elif left < config.certificate_min_days * DAY:
        status = "expiring"
    subject = cert.subject.rfc4514_string()
    expires = dt.datetime.fromtimestamp(not_after, dt.UTC).isoformat(timespec="seconds")
    return SecretState(
        name, "certificate", str(path), status, max(0.0, now - not_before), None,
        expires_at=not_after, note=f"{subject}, expires {expires}",
    )  # fmt: skip


def _client_secrets(config: SecretsConfig, db_path: Path, now: float) -> list[SecretState]:
    from gateway.identity.accounts import AccountStore, StoreLocked  # noqa: PLC0415 - duckdb

    if not db_path.exists():
        return []
    try:
        with AccountStore.open_waiting(db_path, migrate=False) as store:
            clients = store.list_clients()
    except StoreLocked:
        return [
            SecretState(
                "client_secret:*", "client_secret", str(db_path), "unreadable", None, None,
                note="the account store stayed locked",
            )
        ]  # fmt: skip
    return [
        _aged(
            config,
            f"client_secret:{client.client_id}",
            "client_secret",
            f"{db_path} (client {client.client_id})",
            created_at=client.rotated_at.timestamp(),
            now=now,
        )
        for client in clients
        if client.status == "active"
    ]


class _KeystoreListing:
    """The keystore's entries, listed once (no value decrypted), or why they cannot be."""

    def __init__(self, config: SecretsConfig) -> None:
        from empsecrets.providers import Keystore, SecretError  # noqa: PLC0415 - on use

        self.path = config.keystore_file
        self.exists = self.path.exists()
        self.entries: dict[str, KeystoreEntry] = {}
        self.error = ""
        if not self.exists:
            return
        try:
            listed = Keystore.open(self.path, config.master_key_file).list()
        except (SecretError, OSError) as exc:
            self.error = str(exc)
            return
        self.entries = {entry.name: entry for entry in listed}


def _keystore(
    config: SecretsConfig, listing: _KeystoreListing, referenced: set[str], now: float
) -> list[SecretState]:
    """The keystore's master key (a provider credential) and each entry no key setting names."""
    if not listing.exists:
        return []
    master = _secret_file(config, "keystore_master", "key", config.master_key_file, now)
    if listing.error:
        name, path = "keystore:*", str(listing.path)
        return [
            master,
            SecretState(name, "key", path, "unreadable", None, None, note=listing.error),
        ]
    return [
        master,
        *(
            _aged(
                config,
                f"keystore:{entry.name}",
                "shared_secret",
                f"{listing.path} (version {entry.version})",
                created_at=entry.created_at.timestamp(),
                now=now,
            )
            for name, entry in sorted(listing.entries.items())
            if name not in referenced
        ),
    ]


def _referenced_key(
    config: GatewayConfig, key: GatewayKey, listing: _KeystoreListing, now: float
) -> SecretState:
    """A key read by reference: listed by its reference, aged where its provider knows when."""
    from empsecrets import providers  # noqa: PLC0415 - on use

    limits, name, source = config.secrets, key.name, key.reference
    reference = providers.parse_reference(source)
    if isinstance(reference, providers.FileReference):
        return _secret_file(limits, name, "key", reference.path, now, source=source)
    if isinstance(reference, providers.KeystoreReference):
        entry = listing.entries.get(reference.name)
        if listing.error or entry is None:
            status: Status = "unreadable" if listing.error else "missing"
            note = listing.error or f"no such entry in {listing.path}; run `gateway setup`"
            return SecretState(name, "key", source, status, None, None, note=note)
        return _aged(limits, name, "key", source, created_at=entry.created_at.timestamp(),
                     now=now, note=f"{source}, version {entry.version}")  # fmt: skip
    if isinstance(reference, providers.EnvReference):
        # Resolving would delete the variable (and the gateway deleted it at start already).
        return _age_unknown(limits, key, "env: the provider keeps no date")
    return _vault_key(config, key, now)


def _age_unknown(config: SecretsConfig, key: GatewayKey, why: str) -> SecretState:
    limit = max_age_seconds(config, key.name)
    note = f"{key.reference}: {why}; the age is unknown"
    return SecretState(key.name, "key", key.reference, "ok", None, limit, note=note)


def _vault_key(config: GatewayConfig, key: GatewayKey, now: float) -> SecretState:
    """Vault knows a version's created_time, but tells it with the value: read, then dropped."""
    from empsecrets.providers import SecretError, SecretNotFoundError, resolve  # noqa: PLC0415
    from gateway.keys import provider_settings  # noqa: PLC0415 - on use, like every provider

    limits, name, source = config.secrets, key.name, key.reference
    try:
        secret = resolve(source, settings=provider_settings(limits))
    except SecretNotFoundError as exc:
        return SecretState(name, "key", source, "missing", None, None, note=str(exc))
    except SecretError as exc:
        return SecretState(name, "key", source, "unreadable", None, None, note=str(exc))
    if secret.created_at is None:
        return _age_unknown(limits, key, "Vault gave no created_time")
    return _aged(limits, name, "key", source, created_at=secret.created_at.timestamp(),
                 now=now, note=f"{source}, version {secret.version}")  # fmt: skip


def _data_key_ring(config: GatewayConfig, now: float) -> SecretState:
    """The audit store's data key ring, aged by its current key (`secrets rotate` renews it)."""
    from empsecrets.fieldcrypt import DataKeyError, resolve_ring  # noqa: PLC0415 - on use
    from empsecrets.providers import SecretError, SecretNotFoundError  # noqa: PLC0415
    from gateway.auditcrypt import provider_settings  # noqa: PLC0415

    name, source = "gateway_data_key", config.encryption.data_keys
    try:
        ring = resolve_ring(source, provider_settings(config))
    except SecretNotFoundError as exc:
        return SecretState(name, "key", source, "missing", None, None, note=str(exc))
    except (SecretError, DataKeyError) as exc:
        return SecretState(name, "key", source, "unreadable", None, None, note=str(exc))
    current = ring.current_key
    note = f"{source}, current key {current.key_id}, {len(ring.keys)} in the ring"
    return _aged(config.secrets, name, "key", source, created_at=current.created_at.timestamp(),
                 now=now, note=note)  # fmt: skip


def inventory(config: GatewayConfig, *, now: float | None = None) -> list[SecretState]:
    """Every secret this configuration makes the gateway hold, in a stable order."""
    from empsecrets.providers import KeystoreReference, parse_reference  # noqa: PLC0415 - on use
    from gateway.keys import gateway_keys  # noqa: PLC0415 - on use

    now = time.time() if now is None else now
    limits = config.secrets
    states: list[SecretState] = []
    if config.issuer.enabled:
        states.append(_signing_keys(limits, config.issuer.key_dir, now))
    states.append(
        _secret_file(limits, "upstream_secret", "shared_secret", config.upstream.secret_file, now)
    )
    listing = _KeystoreListing(limits)
    referenced: set[str] = set()
    for key in gateway_keys(config):
        if key.setting.startswith("identity.") and not config.identity.enabled:
            continue
        reference = parse_reference(key.reference)
        if isinstance(reference, KeystoreReference):
            referenced.add(reference.name)
        states.append(_referenced_key(config, key, listing, now))
    states.append(_data_key_ring(config, now))
    ring = parse_reference(config.encryption.data_keys)
    if isinstance(ring, KeystoreReference):
        referenced.add(ring.name)
    if config.identity.enabled:
        states += _client_secrets(limits, config.identity.db_path, now)
    certificates: list[tuple[str, Path | None]] = [
        ("tls_certificate", config.tls.cert_file),
        ("tls_ca_certificate", config.tls.ca_file),
    ]
    states += _keystore(limits, listing, referenced, now)
    if config.siem.enabled:
        certificates.append(("siem_client_certificate", config.siem.client_cert_file))
    states += [_certificate(limits, n, p, now) for n, p in certificates if p is not None]
    return states


def render(states: list[SecretState]) -> str:
    """The table `gateway secrets check` prints."""
    rows = [("SECRET", "KIND", "AGE", "LIMIT", "STATUS", "NOTE")]
    for state in states:
        age = _days(state.age_seconds)
        if state.expires_at is not None:
            limit = f"expires in {_days(state.expires_at - time.time())}"
        else:
            limit = _days(state.max_age_seconds)
        rows.append((state.name, state.kind, age, limit, state.status, state.note or state.source))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    # The first five columns padded to their widest cell; the note runs on.
    lines = ["  ".join([*(row[i].ljust(widths[i]) for i in range(5)), row[5]]) for row in rows]
    failing = [s.name for s in states if s.failing]
    lines.append(
        f"{len(failing)} of {len(states)} need attention"
        + (f": {', '.join(failing)}" if failing else "")
    )
    return "\n".join(line.rstrip() for line in lines)


def _days(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days = seconds / DAY
    return f"{days:.1f}d" if abs(days) < 10 else f"{days:.0f}d"  # noqa: PLR2004 - display only


def as_json(states: list[SecretState]) -> str:
    """The JSON document `gateway secrets check --json` prints."""
    return json.dumps(
        {"secrets": [s.public() for s in states], "failing": [s.name for s in states if s.failing]},
        indent=2,
    )
