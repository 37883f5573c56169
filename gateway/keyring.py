"""The built-in issuer's signing keys: one active key, retired keys kept until their tokens expire.

The key file is key_dir/signing.jwks.json: {"keys": [private JWKs]}, the active key first;
keys that no longer sign carry retired_at. Only public parts ever leave this module.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import structlog
from jwcrypto import jwk

from empsecrets.files import exclusive_lock, write_private
from gateway.jwks import parse_jwks
from gateway.keys import SIGNING_KEYS_FILE

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import jwt

log = structlog.get_logger("gateway.keyring")

Algorithm = Literal["EdDSA", "ES256"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
LOCK_FILE = ".rotate.lock"
_KEY_SHAPES: dict[str, dict[str, str]] = {
    "EdDSA": {"kty": "OKP", "crv": "Ed25519"},
    "ES256": {"kty": "EC", "crv": "P-256"},
}
_METADATA = ("created_at", "retired_at")  # ours, not JWK members
_INIT_HINT = "run `gateway keys init`"


def generate_key(algorithm: Algorithm, *, now: int | None = None) -> dict[str, Any]:
    """A new private signing JWK; its kid is the RFC 7638 thumbprint of the public key."""
    key = jwk.JWK.generate(**_KEY_SHAPES[algorithm])
    exported: dict[str, Any] = key.export(private_key=True, as_dict=True)
    created_at = int(time.time()) if now is None else now
    exported.update(kid=key.thumbprint(), alg=algorithm, use="sig", created_at=created_at)
    return exported


def keyring_path(key_dir: Path) -> Path:
    """Where the key file lives."""
    return key_dir / SIGNING_KEYS_FILE


def ensure_keyring(key_dir: Path, algorithm: Algorithm) -> bool:
    """Create the key file with one active key unless it exists; True if created."""
    with exclusive_lock(key_dir / LOCK_FILE):
        if keyring_path(key_dir).exists():
            return False
        _write(key_dir, [generate_key(algorithm)])
    return True


def load_keyring(key_dir: Path) -> list[dict[str, Any]]:
    """The private keys, active first; a missing, empty or garbled file is a refusal."""
    path = keyring_path(key_dir)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no signing key; {_INIT_HINT}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        # The decoder's message quotes no content, but say less anyway: this is a private file.
        raise ValueError(f"{path}: not a JSON key set; {_INIT_HINT} --force") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{path}: the key set is empty; {_INIT_HINT} --force")
    seen: set[str] = set()
    for index, entry in enumerate(keys):
        where = f"{path}: keys[{index}]"
        _check_entry(entry, where)
        if entry["kid"] in seen:
            raise ValueError(f"{where}: duplicate kid {entry['kid']!r}")
        seen.add(entry["kid"])
    if "retired_at" in keys[0]:
        raise ValueError(f"{path}: the first (active) key is retired; run `gateway keys rotate`")
    return keys


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: not a JWK object")  # noqa: TRY004 - a bad file, not a bad call
    if not isinstance(entry.get("kid"), str) or not entry["kid"]:
        raise ValueError(f"{where}: kid missing")
    if entry.get("alg") not in ALGORITHMS:
        raise ValueError(f"{where}: alg must be one of {list(ALGORITHMS)}")
    shape = _KEY_SHAPES[entry["alg"]]
    if entry.get("kty") != shape["kty"] or entry.get("crv") != shape["crv"]:
        raise ValueError(f"{where}: alg {entry['alg']} needs kty {shape['kty']} {shape['crv']}")
    for name in _METADATA:
        value = entry.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: {name} must be epoch seconds")
    try:
        key = jwk.JWK(**{k: v for k, v in entry.items() if k not in _METADATA})
    except Exception:  # noqa: BLE001 - jwcrypto raises several types; the message says enough
        key = None
    # The error names the entry, never a key member: this is a private file.
    if key is None or not key.has_private:
        raise ValueError(f"{where}: not a usable private {entry['alg']} key")


def public_jwk(entry: dict[str, Any]) -> dict[str, Any]:
    """The public half of one private key entry, with its kid, alg and use."""
    members = {k: v for k, v in entry.items() if k not in _METADATA}
    public: dict[str, Any] = jwk.JWK(**members).export_public(as_dict=True)
    public.update(kid=entry["kid"], alg=entry["alg"], use="sig")
    return public


def _is_expired(entry: dict[str, Any], now: float, retire_after_seconds: float) -> bool:
    """Retired long enough ago that every token it signed has expired."""
    retired_at = entry.get("retired_at")
    return retired_at is not None and bool(retired_at + retire_after_seconds < now)


@dataclass(frozen=True)
class RotationPlan:
    """What a rotation does: the new active key, the keys it retires and the keys it drops."""

    new_kid: str
    retired_kids: tuple[str, ...]
    dropped_kids: tuple[str, ...]
    now: int
    # repr=False: a plan printed or logged must not carry private keys.
    new_key: dict[str, Any] = field(repr=False)
    keys: tuple[dict[str, Any], ...] = field(repr=False)  # the file after rotation, active first

    def public_summary(self) -> dict[str, Any]:
        """The plan for audit and CLI output: kids, algorithms and ages, no key material."""
        listed = [
            {
                "kid": entry["kid"],
                "alg": entry["alg"],
                "age_seconds": self.now - entry["created_at"],
                "retired_at": entry.get("retired_at"),
            }
            for entry in self.keys
        ]
        return {
            "active_kid": self.new_kid,
            "retired_kids": list(self.retired_kids),
            "dropped_kids": list(self.dropped_kids),
            "keys": listed,
        }


def plan_rotation(
    keys: list[dict[str, Any]],
    *,
    algorithm: Algorithm,
    now: int,
    retire_after_seconds: float,
) -> RotationPlan:
    """A new active key; the old active key retires now; keys retired long enough are dropped."""
    new_key = generate_key(algorithm, now=now)
    kept: list[dict[str, Any]] = [new_key]
    retired: list[str] = []
    dropped: list[str] = []
    for entry in keys:
        if _is_expired(entry, now, retire_after_seconds):
            dropped.append(entry["kid"])
            continue
        if "retired_at" not in entry:
            # The active key; also any older key a pre-rotation file listed without retired_at.
            entry = {**entry, "retired_at": now}  # noqa: PLW2901 - a retired copy, not the input
            retired.append(entry["kid"])
        kept.append(entry)
    return RotationPlan(
        new_kid=new_key["kid"],
        retired_kids=tuple(retired),
        dropped_kids=tuple(dropped),
        now=now,
        new_key=new_key,
        keys=tuple(kept),
    )


def rotate(
    key_dir: Path,
    *,
    algorithm: Algorithm,
    retire_after_seconds: float,
    dry_run: bool,
    now: int | None = None,
) -> RotationPlan:
    """Plan a rotation and, unless dry_run, write it; concurrent rotations are serialised.

    retire_after_seconds must cover the longest token life: issuer.max_ttl_seconds plus
    authn.leeway_seconds.
    """
    with exclusive_lock(key_dir / LOCK_FILE):
        # Load inside the lock: two rotations that both read the old file would each write
        # a file without the other's new key.
        plan = plan_rotation(
            load_keyring(key_dir),
            algorithm=algorithm,
            now=int(time.time()) if now is None else now,
            retire_after_seconds=retire_after_seconds,
        )
        if not dry_run:
            _write(key_dir, list(plan.keys))
    return plan


def _write(key_dir: Path, keys: list[dict[str, Any]]) -> None:
    # write_private replaces the file atomically: a gateway reading it sees old or new, whole.
    write_private(keyring_path(key_dir), json.dumps({"keys": keys}, indent=2) + "\n")


@dataclass(frozen=True)
class _Loaded:
    """One consistent reading of the key file, swapped in whole on reload."""

    keys: tuple[dict[str, Any], ...]
    public: tuple[dict[str, Any], ...]
    verification: dict[str, jwt.PyJWK]
    revision: str
    signature: tuple[int, ...]


class KeyRing:
    """The running gateway's view of the key file: the active key to sign, all keys to verify.

    Reload with reload_if_changed() (one stat when nothing changed); a broken file on reload
    keeps the last good keys.
    """

    def __init__(
        self,
        key_dir: Path,
        *,
        allowed_algorithms: frozenset[str],
        retire_after_seconds: float,
    ) -> None:
        self.path = keyring_path(key_dir)
        self._key_dir = key_dir
        self._allowed = allowed_algorithms
        self._retire_after = retire_after_seconds
        self._loaded: _Loaded | None = None
        self.reloads = 0  # successful loads after the first

    def __repr__(self) -> str:
        return f"KeyRing({self.path!s}, revision={self.revision if self._loaded else None})"

    def load(self) -> None:
        """Read the key file; raises (naming the path) when it cannot be used."""
        # Stat before reading: a rotation landing in between is then seen as a change later.
        try:
            signature = self._stat()
        except FileNotFoundError:
            signature = ()  # load_keyring says what is missing and how to create it
        keys = load_keyring(self._key_dir)
        public = tuple(public_jwk(entry) for entry in keys)
        verification = parse_jwks({"keys": list(public)}, self._allowed)
        if keys[0]["kid"] not in verification:
            raise ValueError(
                f"{self.path}: the active key's alg {keys[0]['alg']} is not in "
                "authn.allowed_algorithms; add it or set issuer.algorithm and rotate"
            )
        kids = ",".join(entry["kid"] for entry in keys)
        self._loaded = _Loaded(
            keys=tuple(keys),
            public=public,
            verification=verification,
            revision=hashlib.sha256(kids.encode("utf-8")).hexdigest()[:16],
            signature=signature,
        )

    def reload_if_changed(self) -> bool:
        """Reload when the file changed since the last load; True if new keys were loaded."""
        try:
            signature = self._stat()
        except OSError as exc:
            log.warning("keyring.reload_failed", path=str(self.path), error=type(exc).__name__)
            return False
        if self._loaded is not None and signature == self._loaded.signature:
            return False
        previous = self._loaded
        try:
            self.load()
        except (OSError, ValueError) as exc:
            # Keep signing and verifying with the last good keys; remember the broken file's
            # stat so it is not parsed (and logged) again until it changes.
            log.warning("keyring.reload_failed", path=str(self.path), error=type(exc).__name__)
            if previous is not None:
                self._loaded = _Loaded(
                    previous.keys,
                    previous.public,
                    previous.verification,
                    previous.revision,
                    signature,
                )
            return False
        self.reloads += 1
        log.info("keyring.reloaded", revision=self.revision, active_kid=self.active["kid"])
        return True

    def _stat(self) -> tuple[int, ...]:
        stat = self.path.stat()
        # The inode and ctime change on every atomic replace, even within one mtime tick.
        return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)

    @property
    def loaded(self) -> bool:
        """Whether a key file was loaded."""
        return self._loaded is not None

    @property
    def _current(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeError("KeyRing.load() was not called")
        return self._loaded

    @property
    def active(self) -> dict[str, Any]:
        """The private JWK that signs new tokens."""
        return self._current.keys[0]

    @property
    def active_age_seconds(self) -> float:
        """How long ago the active key was created."""
        created_at: int = self.active["created_at"]
        return time.time() - created_at

    @property
    def revision(self) -> str:
        """A short hash of the kid list: changes whenever a key is added or dropped."""
        return self._current.revision

    def _usable(self, entry: dict[str, Any], now: float | None) -> bool:
        return not _is_expired(entry, time.time() if now is None else now, self._retire_after)

    def public_jwks(self, *, now: float | None = None) -> dict[str, Any]:
        """The JWKS to publish: public parts of the keys whose tokens may still be valid."""
        loaded = self._current
        published = []
        for entry, public in zip(loaded.keys, loaded.public, strict=True):
            if self._usable(entry, now):
                published.append(dict(public))
        return {"keys": published}

    def verification_keys(self, *, now: float | None = None) -> dict[str, jwt.PyJWK]:
        """Parsed public keys by kid, for the keys whose tokens may still be valid."""
        loaded = self._current
        usable: dict[str, jwt.PyJWK] = {}
        for entry in loaded.keys:
            key = loaded.verification.get(entry["kid"])
            if key is not None and self._usable(entry, now):
                usable[entry["kid"]] = key
        return usable

    def verification_key(self, kid: str | None, *, now: float | None = None) -> jwt.PyJWK | None:
        """The key for kid (None: the only usable key, if there is exactly one)."""
        if kid is None:
            usable = self.verification_keys(now=now)
            return next(iter(usable.values())) if len(usable) == 1 else None
        loaded = self._current
        key = loaded.verification.get(kid)
        if key is None:
            return None
        for entry in loaded.keys:
            if entry["kid"] == kid:
                return key if self._usable(entry, now) else None
        return None


class KeyRingSource:
    """gateway.jwks.KeySource over a KeyRing: an unknown kid rereads the file, rate-limited.

    A token signed by a key that `gateway keys rotate` (another process) just created verifies
    at once; a flood of forged kids costs at most one stat per cooldown.
    """

    def __init__(
        self,
        ring: KeyRing,
        *,
        cooldown_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ring = ring
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._last_check = -float("inf")
        self.reload_checks = 0  # how often an unknown kid made us look at the file

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for kid, rereading the key file first when kid is unknown (rate-limited)."""
        found = self.ring.verification_key(kid)
        if found is not None or kid is None:
            return found
        now = self._clock()
        if now - self._last_check < self._cooldown:
            return None
        self._last_check = now
        self.reload_checks += 1
        # On the loop: a stat is microseconds; parsing happens only after a real rotation.
        if not self.ring.reload_if_changed():
            return None
        return self.ring.verification_key(kid)

    @property
    def ready(self) -> bool:
        """Ready when at least one key may verify tokens."""
        return self.ring.loaded and bool(self.ring.verification_keys())
