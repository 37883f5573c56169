"""Sensitive column values sealed with AES-256-GCM under a ring of data keys.

A sealed value is text, so it fits the VARCHAR column the plaintext had:

    enc1.<key id>.<base64(12-byte nonce || ciphertext || 16-byte tag)>

The associated data is the prefix, the key id and a *context* the caller names (table,
column and row id), so a value copied to another row or column does not open. Several keys
may open values; one, the current key, seals new ones. Rotation adds a key and makes it
current; a re-encryption pass (`resealed`) then moves every value to it.

Equality lookups on a sealed column (an employee's email) use a *blind index*: HMAC-SHA256
of the value under the ring's index key, which stays the same across data-key rotations so
that lookups and uniqueness hold while a rotation is half done.

The ring is one JSON document kept by a secret provider (`empsecrets.providers`), by
default in the encrypted keystore; its text never reaches a log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from empsecrets.providers import (
    Keystore,
    KeystoreError,
    KeystoreReference,
    ProviderSettings,
    SecretError,
    SecretNotFoundError,
    parse_reference,
    resolve,
)

PREFIX = "enc1"
KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,63}$")
_TOKEN = re.compile(r"^enc1\.([a-z0-9][a-z0-9-]{2,63})\.([A-Za-z0-9+/]+={0,2})$")
RING_FORMAT = "emp-data-keys/1"


class DataKeyError(Exception):
    """A key ring that cannot be used, or a sealed value that does not open. Fail closed."""


@dataclass(frozen=True)
class DataKey:
    """One AES-256 key and when it was made."""

    key_id: str
    material: bytes
    created_at: datetime

    def __repr__(self) -> str:
        return f"DataKey(key_id={self.key_id!r}, created_at={self.created_at.isoformat()!r})"


@dataclass(frozen=True)
class DataKeyRing:
    """The keys that open values, which one seals, and the blind-index key."""

    current: str
    keys: dict[str, DataKey]
    index_key: bytes

    def __repr__(self) -> str:
        return f"DataKeyRing(current={self.current!r}, keys={sorted(self.keys)!r})"

    @classmethod
    def generate(cls, now: datetime | None = None) -> DataKeyRing:
        """A new ring with one current key and a fresh index key."""
        key = _new_key(now or datetime.now(UTC))
        return cls(current=key.key_id, keys={key.key_id: key}, index_key=os.urandom(KEY_BYTES))

    def rotated(self, now: datetime | None = None) -> DataKeyRing:
        """A copy with a new key that becomes current; old keys still open old values."""
        key = _new_key(now or datetime.now(UTC))
        return DataKeyRing(
            current=key.key_id, keys={**self.keys, key.key_id: key}, index_key=self.index_key
        )

    def without(self, key_ids: set[str]) -> DataKeyRing:
        """A copy without the retired keys `key_ids` (never the current one)."""
        if self.current in key_ids:
            raise DataKeyError("the current data key cannot be removed from the ring")
        kept = {key_id: key for key_id, key in self.keys.items() if key_id not in key_ids}
        return DataKeyRing(current=self.current, keys=kept, index_key=self.index_key)

    @property
    def current_key(self) -> DataKey:
        """The key new values are sealed under."""
        return self.keys[self.current]

    def dumps(self) -> str:
        """The ring as the JSON text a secret provider keeps."""
        return json.dumps(
            {
                "format": RING_FORMAT,
                "current": self.current,
                "index_key": _b64(self.index_key),
                "keys": [
                    {
                        "id": key.key_id,
                        "key": _b64(key.material),
                        "created_at": key.created_at.isoformat(),
                    }
                    for key in self.keys.values()
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str) -> DataKeyRing:
        """Parse a ring; anything malformed raises DataKeyError without quoting the text."""
        try:
            document = json.loads(text)
        except ValueError:
            raise DataKeyError("the data key ring is not JSON") from None
        if not isinstance(document, dict) or document.get("format") != RING_FORMAT:
            raise DataKeyError(f"the data key ring is not in the {RING_FORMAT} format")
        keys = {key.key_id: key for key in map(_parse_key, _list(document.get("keys")))}
        current = document.get("current")
        if not isinstance(current, str) or current not in keys:
            raise DataKeyError("the data key ring's current key is not among its keys")
        index_key = _unb64(document.get("index_key"), "index_key")
        if len(index_key) != KEY_BYTES:
            raise DataKeyError("the data key ring's index key is not 32 bytes")
        return cls(current=current, keys=keys, index_key=index_key)


class FieldCipher:
    """Seals and opens column values, and computes blind indexes, with one key ring."""

    def __init__(self, ring: DataKeyRing) -> None:
        self.ring = ring
        self._aead = {key_id: AESGCM(key.material) for key_id, key in ring.keys.items()}

    def seal(self, value: str, context: str) -> str:
        """`value` sealed under the current key, bound to `context`."""
        key_id = self.ring.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[key_id].encrypt(nonce, value.encode("utf-8"), _aad(key_id, context))
        return f"{PREFIX}.{key_id}.{binascii.b2a_base64(nonce + sealed, newline=False).decode()}"

    def open(self, token: str, context: str) -> str:
        """The value of a sealed token; DataKeyError when it is not one, or does not open."""
        # Measured: split + a2b_base64 take a third of the time of a regex + urlsafe decode,
        # and a page of 100 tickets opens 200 values.
        prefix, key_id, encoded = _parts(token)
        aead = self._aead.get(key_id)
        if aead is None or prefix != PREFIX:
            if prefix != PREFIX or not _KEY_ID.match(key_id):
                raise DataKeyError(
                    "a value that should be sealed is not (plaintext in a sealed column)"
                )
            raise DataKeyError(f"a value is sealed under data key {key_id!r}, not in the ring")
        try:
            blob = binascii.a2b_base64(encoded, strict_mode=True)
        except binascii.Error:
            raise DataKeyError("a sealed value is not base64") from None
        if len(blob) < NONCE_BYTES + 16:
            raise DataKeyError("a sealed value is too short")
        try:
            plain = aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(key_id, context))
        except InvalidTag:
            raise DataKeyError(f"a value sealed under {key_id!r} failed authentication") from None
        return plain.decode("utf-8")

    def is_current(self, value: str) -> bool:
        """Whether `value` is sealed under the current key (plaintext is not)."""
        return sealed_key_id(value) == self.ring.current

    def digest(self, value: str, context: str) -> str:
        """The blind index of `value` (hex HMAC-SHA256 under the index key)."""
        message = context.encode("utf-8") + b"\x00" + value.encode("utf-8")
        return hmac.new(self.ring.index_key, message, hashlib.sha256).hexdigest()


def resolve_ring(reference: str, settings: ProviderSettings) -> DataKeyRing:
    """The ring a secret reference names (at start and on rotation, never per request)."""
    return DataKeyRing.loads(resolve(reference, settings=settings).value)


def provision_ring(reference: str, settings: ProviderSettings) -> bool:
    """Make a ring where a `keystore:` reference points, unless one is there; True if made.

    The keystore itself is created on first use. Other providers are provisioned by their
    operator (the ring's JSON is stored as the secret); for them this only checks that the
    reference resolves to a ring, raising SecretError or DataKeyError otherwise.
    """
    parsed = parse_reference(reference)
    if not isinstance(parsed, KeystoreReference):
        resolve_ring(reference, settings)
        return False
    if settings.keystore_file.exists() or settings.keystore_file.is_symlink():
        keystore = Keystore.open(settings.keystore_file, settings.master_key_file)
    else:
        keystore = Keystore.create(settings.keystore_file, settings.master_key_file)
    try:
        DataKeyRing.loads(keystore.get(parsed.name).value)
    except SecretNotFoundError:
        keystore.put(parsed.name, DataKeyRing.generate().dumps())
        return True
    return False


def ring_exists(reference: str, settings: ProviderSettings) -> bool:
    """Whether a reference names something; False only when nothing is stored there."""
    try:
        resolve(reference, settings=settings)
    except SecretNotFoundError:
        return False
    except KeystoreError:
        # No keystore or master key file yet: nothing is stored there either.
        if not settings.keystore_file.exists():
            return False
        raise
    return True


def store_ring(reference: str, settings: ProviderSettings, ring: DataKeyRing) -> None:
    """Write a changed ring back; only the keystore can be written from here."""
    parsed = parse_reference(reference)
    if not isinstance(parsed, KeystoreReference):
        raise SecretError(
            f"{reference}: only keystore: rings can be rotated by the gateway; store the"
            " rotated ring in that provider yourself (docs/security/encryption.md)"
        )
    Keystore.open(settings.keystore_file, settings.master_key_file).put(parsed.name, ring.dumps())


def sealed_key_id(value: object) -> str | None:
    """The key id of a sealed token, or None for anything else (plaintext, NULL)."""
    if not isinstance(value, str):
        return None
    match = _TOKEN.match(value)
    return match.group(1) if match else None


def _parts(token: str) -> tuple[str, str, str]:
    parts = token.split(".", 2) if isinstance(token, str) else []
    if len(parts) != 3:  # noqa: PLR2004 - prefix, key id, body
        raise DataKeyError("a value that should be sealed is not (plaintext in a sealed column)")
    return parts[0], parts[1], parts[2]


def _aad(key_id: str, context: str) -> bytes:
    return f"{PREFIX}.{key_id}.{context}".encode()


def _new_key(now: datetime) -> DataKey:
    key_id = f"dk-{now:%Y%m%d}-{secrets.token_hex(4)}"
    return DataKey(key_id=key_id, material=os.urandom(KEY_BYTES), created_at=now)


def _parse_key(raw: object) -> DataKey:
    if not isinstance(raw, dict):
        raise DataKeyError("a data key entry is not an object")
    key_id = raw.get("id")
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
        raise DataKeyError("a data key id is missing or malformed")
    material = _unb64(raw.get("key"), f"key {key_id}")
    if len(material) != KEY_BYTES:
        raise DataKeyError(f"data key {key_id!r} is not 32 bytes")
    try:
        created_at = datetime.fromisoformat(str(raw.get("created_at")))
    except ValueError:
        raise DataKeyError(f"data key {key_id!r} has no valid created_at") from None
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return DataKey(key_id=key_id, material=material, created_at=created_at)


def _list(raw: object) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise DataKeyError("the data key ring has no keys")
    return raw


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise DataKeyError(f"the data key ring's {what} is missing")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise DataKeyError(f"the data key ring's {what} is not base64url") from None
