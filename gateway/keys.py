"""Token signing, the upstream shared secret, and the gateway's own keys read by reference.

The session, TOTP, model and audit-checkpoint keys are named in config by secret references
(`keystore:NAME` by default, `file:`, `env:`, `vault:`) and read here, through `resolve_key`,
at start and on a reload; `gateway setup` provisions them (`provision_key`). The signing keys
themselves (generation, rotation, publication) live in gateway/keyring.py.

Private material is written 0600 and never logged; only public keys leave this module.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import jwt
import structlog

from empsecrets.files import write_private
from empsecrets.providers import (
    EnvReference,
    FileReference,
    Keystore,
    KeystoreError,
    KeystoreReference,
    ProviderSettings,
    Secret,
    SecretError,
    SecretNotFoundError,
    VaultSettings,
    parse_reference,
    read_file_secret,
    resolve,
)
from gateway.logs import register_secret

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.config import GatewayConfig, SecretsConfig
    from gateway.identity.mfa import SecretBox

SIGNING_KEYS_FILE = "signing.jwks.json"
T = TypeVar("T")
log = structlog.get_logger("gateway.keys")
_BOOKKEEPING = frozenset({"created_at", "retired_at"})  # key-ring fields that are not JWK members


def mint_token(
    private_key: dict[str, Any],
    *,
    issuer: str,
    audience: str,
    subject: str,
    roles: list[str],
    ttl_seconds: int,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """Sign an access token with the dev issuer's key."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "roles": roles,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "amr": ["dev"],
    }
    claims.update(extra_claims or {})
    signing = jwt.PyJWK({k: v for k, v in private_key.items() if k not in _BOOKKEEPING})
    return jwt.encode(
        claims, signing.key, algorithm=private_key["alg"], headers={"kid": private_key["kid"]}
    )


def ensure_upstream_secret(path: Path, *, force: bool = False) -> bool:
    """Generate the secret the gateway presents to the upstream; True if generated."""
    if path.exists() and not force:
        return False
    write_private(path, secrets.token_urlsafe(32) + "\n")
    return True


def read_secret(path: Path) -> str:
    """A secret file's content; missing or empty is a refusal to start (fail closed)."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: secret file missing; run `gateway keys init`") from None
    if not value:
        raise ValueError(f"{path}: secret file is empty; run `gateway keys init --force`")
    return value


class SecretFile:
    """A one-line secret file, re-read when it changes (a rotation).

    The caller asks for `current()` per use; the file is looked at once per `check_seconds`.

    A file that turns missing, empty or unreadable keeps the last good value (and says so in
    the log): a botched edit must not take the gateway down, and the old value is still one
    the other side knows.
    """

    def __init__(
        self,
        path: Path,
        *,
        on_new: Callable[[str], str] = lambda value: value,
        check_seconds: float = 1.0,
    ) -> None:
        self.path = path
        self._on_new = on_new  # e.g. register the value with the log mask
        self._check = check_seconds
        self._stat = _identity(path)
        self._value = on_new(read_secret(path))  # missing or empty at start: refuse to start
        self._next_check = time.monotonic() + check_seconds

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"  # never the value

    def current(self) -> str:
        """The secret as the file holds it now (at most check_seconds old)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self._check
            self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            identity = _identity(self.path)
        except OSError:
            log.warning("secret_file.unreadable", path=str(self.path))
            return
        if identity == self._stat:
            return
        try:
            value = read_secret(self.path)
        except (OSError, ValueError):
            log.warning("secret_file.unreadable", path=str(self.path))
            return
        self._value = self._on_new(value)
        self._stat = identity
        log.info("secret_file.reloaded", path=str(self.path))


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


# --- the gateway's own keys, by secret reference -------------------------------------------


def provider_settings(secrets: SecretsConfig) -> ProviderSettings:
    """Where `keystore:` references are read, and the Vault `vault:` references ask."""
    vault = None
    if secrets.vault_address:
        vault = VaultSettings(
            address=secrets.vault_address,
            token=secrets.vault_token,
            ca_file=secrets.vault_ca_file,
            namespace=secrets.vault_namespace or None,
        )
    return ProviderSettings(
        keystore_file=secrets.keystore_file, master_key_file=secrets.master_key_file, vault=vault
    )


def resolve_key(reference: str, secrets: SecretsConfig, *, setting: str) -> Secret:
    """The secret a key setting names: the one way the gateway reads its own keys.

    Blocking (files, one Vault request): at start and on a reload, never per request. The
    value is masked in every later log line. A failure is a SecretError naming the setting and
    the reference (safe to log), never a value: the caller refuses to start.
    """
    try:
        secret = resolve(reference, settings=provider_settings(secrets))
    except SecretNotFoundError as exc:
        hint = "`gateway setup` makes the gateway's keys where keystore: and file: references point"
        raise SecretNotFoundError(f"{setting} ({reference}): {exc}; {hint}") from None
    except SecretError as exc:
        raise type(exc)(f"{setting} ({reference}): {exc}") from None
    register_secret(secret.value)
    return secret


class ResolvedSecret:
    """A key resolved from its reference now (fail closed), and again by `reload()`.

    An `env:` variable is read once per process (the provider deletes it), so its reload
    keeps the value read at start.
    """

    def __init__(self, reference: str, secrets: SecretsConfig, *, setting: str) -> None:
        self.reference = reference
        self._secrets = secrets
        self._setting = setting
        self.secret = resolve_key(reference, secrets, setting=setting)

    def __repr__(self) -> str:
        return f"ResolvedSecret({self.reference!r})"  # never the value

    def reload(self) -> Secret:
        """The secret as its provider holds it now (a rotation shows here)."""
        if not isinstance(parse_reference(self.reference), EnvReference):
            self.secret = resolve_key(self.reference, self._secrets, setting=self._setting)
        return self.secret


def totp_box(config: GatewayConfig) -> SecretBox:
    """The box that seals TOTP secrets in the account store (identity.mfa.secret_key)."""
    from gateway.identity.mfa import SecretBox  # noqa: PLC0415 - pyotp and segno, on use

    reference = config.identity.mfa.secret_key_reference
    return _read_key(reference, config.secrets, "identity.mfa.secret_key", SecretBox.from_text)


def session_box(config: GatewayConfig) -> SecretBox:
    """The box that seals the browser session cookie (identity.sessions.key)."""
    from gateway.identity.mfa import SecretBox  # noqa: PLC0415 - pyotp and segno, on use

    reference = config.identity.sessions.key_reference
    return _read_key(reference, config.secrets, "identity.sessions.key", SecretBox.from_text)


def checkpoint_key(config: GatewayConfig) -> Ed25519PrivateKey:
    """The key that signs the audit chain's checkpoints (audit.checkpoint_key)."""
    from gateway.auditchain import parse_checkpoint_key  # noqa: PLC0415 - on use

    def from_pem(pem: str, source: str) -> Ed25519PrivateKey:
        return parse_checkpoint_key(pem.encode("utf-8"), source)

    reference = config.audit.checkpoint_key_reference
    return _read_key(reference, config.secrets, "audit.checkpoint_key", from_pem)


def model_key(config: GatewayConfig) -> ResolvedSecret:
    """The key that signs model files (validation.model_key), checked now; `reload` re-reads it.

    `anomaly.read_key(model_key(config))` is the key bytes; the running gateway calls it at each
    model load, so a rotated key (with models re-trained under it) needs no restart.
    """
    from gateway.validation.anomaly import parse_key  # noqa: PLC0415 - on use

    setting = "validation.model_key"
    key = ResolvedSecret(config.validation.model_key_reference, config.secrets, setting=setting)
    _decoded(setting, key.secret, parse_key)  # a garbled key refuses the start
    return key


def _read_key(
    reference: str, secrets: SecretsConfig, setting: str, decode: Callable[[str, str], T]
) -> T:
    return _decoded(setting, resolve_key(reference, secrets, setting=setting), decode)


def _decoded(setting: str, secret: Secret, decode: Callable[[str, str], T]) -> T:
    """decode(value, source); a value of the wrong form is a ValueError naming the setting."""
    from gateway.validation.anomaly import ModelError  # noqa: PLC0415 - on use

    try:
        return decode(secret.value, secret.source)
    except (ValueError, ModelError) as exc:  # their messages name the source, never the value
        raise ValueError(f"{setting}: {exc}") from None


@dataclass(frozen=True)
class GatewayKey:
    """A key the gateway holds by reference, and how `gateway setup` makes one."""

    name: str  # as `gateway secrets check` lists it
    setting: str  # the config key that holds the reference
    reference: str
    new_value: Callable[[], str]  # a fresh key, as text in the form its reader expects
    write_file: Callable[[Path], bool]  # creates a file: reference's file if missing; True if so
    # The file `gateway setup` wrote this key to before it was read by reference, beside the
    # keystore (var/secrets/): imported once, so sealed TOTP secrets, models, checkpoints open.
    legacy_name: str
    replaced_by_force: bool = False  # `keys init --force` makes a new one


def gateway_keys(config: GatewayConfig) -> list[GatewayKey]:
    """The four keys the gateway reads by reference, as `secrets check` lists them."""
    from gateway.auditchain import ensure_checkpoint_key  # noqa: PLC0415 - on use
    from gateway.identity import mfa  # noqa: PLC0415 - pyotp and segno, on use
    from gateway.validation import anomaly  # noqa: PLC0415 - on use

    identity = config.identity
    return [
        GatewayKey(
            "session_key", "identity.sessions.key", identity.sessions.key_reference,
            mfa.new_sealing_key, mfa.ensure_key_file, "session.key",
            replaced_by_force=True,
        ),
        GatewayKey(
            "totp_key", "identity.mfa.secret_key", identity.mfa.secret_key_reference,
            mfa.new_sealing_key, mfa.ensure_key_file, "totp.key",
            replaced_by_force=True,
        ),
        GatewayKey(
            "audit_checkpoint_key", "audit.checkpoint_key", config.audit.checkpoint_key_reference,
            _new_checkpoint_pem, ensure_checkpoint_key, "audit-checkpoint.key",
        ),
        GatewayKey(
            "model_key", "validation.model_key", config.validation.model_key_reference,
            anomaly.new_key, _ensure_model_key_file, "model.key",
        ),
    ]  # fmt: skip


def provision_key(key: GatewayKey, secrets: SecretsConfig, *, force: bool = False) -> str | None:
    """Make the key where its reference points unless it is there; what was done, or None.

    file: and keystore: only; env: and vault: secrets are provisioned by their operator and
    checked when the gateway starts. The message names where, never the value.
    """
    parsed = parse_reference(key.reference)
    replace = force and key.replaced_by_force
    if isinstance(parsed, FileReference):
        if replace:
            parsed.path.unlink(missing_ok=True)
        return f"wrote {parsed.path}" if key.write_file(parsed.path) else None
    if not isinstance(parsed, KeystoreReference):
        return None
    keystore = _open_or_create_keystore(provider_settings(secrets))
    legacy = secrets.keystore_file.parent / key.legacy_name
    try:
        keystore.get(parsed.name)
    except SecretNotFoundError:
        pass
    else:
        if not replace:
            return None
    if not replace and legacy.exists():
        entry = keystore.put(parsed.name, read_file_secret(FileReference(legacy)).value)
        return (
            f"imported {legacy} into {parsed} (version {entry.version}); it is no longer "
            f"read: delete it (shred -u {legacy})"
        )
    entry = keystore.put(parsed.name, key.new_value())
    return f"wrote {parsed} (version {entry.version}, {keystore.path})"


def _open_or_create_keystore(settings: ProviderSettings) -> Keystore:
    """The keystore, created (with its master key) on first use; a race to create is fine."""
    if not settings.keystore_file.exists():
        try:
            return Keystore.create(settings.keystore_file, settings.master_key_file)
        except KeystoreError:
            if not settings.keystore_file.exists():
                raise  # not the race: a real problem (a directory, a bad master key)
    return Keystore.open(settings.keystore_file, settings.master_key_file)


def _ensure_model_key_file(path: Path) -> bool:
    from gateway.validation import anomaly  # noqa: PLC0415 - on use

    if path.exists():
        return False  # never replaced, not even by --force: it would orphan every saved model
    anomaly.ensure_key(path)
    return True


def _new_checkpoint_pem() -> str:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - on use
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode("ascii")
    )
