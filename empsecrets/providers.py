"""Resolve a secret from a reference (`env:`, `file:`, `keystore:`, `vault:`) at start or rotation.

Config holds references, never values. No message, repr or log line from this module may
contain a secret value or key material; messages name the reference or the file instead.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from empsecrets.files import exclusive_lock, write_private

if TYPE_CHECKING:
    import builtins

    import hvac

DEFAULT_KEYSTORE_FILE = Path("var/secrets/keystore.json")
DEFAULT_MASTER_KEY_FILE = Path("var/secrets/keystore.master")
MASTER_KEY_BYTES = 32  # AES-256
SCHEMES = ("env", "file", "keystore", "vault")

_FORMAT = 1
_CIPHER = "AES-256-GCM"
# 96-bit random nonces (NIST SP 800-38D, 8.2.2): safe for 2**32 encryptions under one key,
# far more than a keystore's puts and rotations will ever make.
_NONCE_BYTES = 12
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A Vault path segment may not be "." or "..": a reference must not climb out of its mount.
_VAULT_SEGMENT = re.compile(r"[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]*")
_VAULT_FIELD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_CREATE_HINT = "create it first: `gateway secrets keystore init`"
_KEYSTORE_NAME_RULE = "keystore:NAME (letters, digits, . _ -; at most 128, not starting with . _ -)"


class SecretError(Exception):
    """A secret cannot be resolved; the message names the reference or file, never a value."""


class SecretReferenceError(SecretError):
    """The reference is malformed or has an unknown scheme (the text is not echoed)."""


class SecretNotFoundError(SecretError):
    """Nothing is stored there: no variable, file, keystore entry, Vault path or field."""


class InsecureSecretFileError(SecretError):
    """A secret file is not a plain file (a symlink, a FIFO) or others may access it."""


class KeystoreError(SecretError):
    """The keystore or its master key is missing, malformed, or exists where one is created."""


class KeystoreIntegrityError(KeystoreError):
    """An entry fails authentication: its bytes were changed or moved from another name."""


class WrongMasterKeyError(KeystoreError):
    """The master key file does not hold the key this keystore is encrypted under."""


class VaultError(SecretError):
    """Vault is unreachable, refused the token, or answered in an unexpected shape."""


@dataclass(frozen=True, kw_only=True, repr=False)
class Secret:
    """A resolved secret. `source` (the reference) is safe to log; the repr hides the value."""

    value: str
    created_at: datetime | None  # None when the provider cannot know (env)
    version: int | None  # keystore and Vault count versions; env and file do not
    source: str

    def __repr__(self) -> str:
        created = None if self.created_at is None else self.created_at.isoformat()
        return (
            f"Secret(source={self.source!r}, version={self.version!r}, "
            f"created_at={created!r}, value=<hidden>)"
        )


@dataclass(frozen=True, kw_only=True)
class VaultSettings:
    """How to reach Vault. `token` is itself a reference (`file:...`), never the token."""

    address: str  # https://vault.example:8200; plain http only to a loopback address
    token: str
    ca_file: Path | None = None  # None: the system's trust store
    namespace: str | None = None
    timeout_seconds: int = 5


@dataclass(frozen=True, kw_only=True)
class ProviderSettings:
    """Where the keystore and its master key are, and the Vault to ask (if any)."""

    keystore_file: Path = DEFAULT_KEYSTORE_FILE
    master_key_file: Path = DEFAULT_MASTER_KEY_FILE
    vault: VaultSettings | None = None


# --- references --------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvReference:
    """`env:NAME`: an environment variable."""

    name: str

    def __str__(self) -> str:
        return f"env:{self.name}"


@dataclass(frozen=True)
class FileReference:
    """`file:PATH`: a file only its owner can read, relative to the working directory."""

    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class KeystoreReference:
    """`keystore:NAME`: an entry in the encrypted local keystore (the default provider)."""

    name: str

    def __str__(self) -> str:
        return f"keystore:{self.name}"


@dataclass(frozen=True)
class VaultReference:
    """`vault:MOUNT/PATH#FIELD`: a field of the latest version of a Vault KV v2 secret."""

    mount: str
    path: str
    field: str

    def __str__(self) -> str:
        return f"vault:{self.mount}/{self.path}#{self.field}"


Reference: TypeAlias = EnvReference | FileReference | KeystoreReference | VaultReference


def parse_reference(text: str) -> Reference:
    """The typed reference for `scheme:target`; SecretReferenceError when it is malformed.

    Messages never quote the text: a secret pasted where a reference belongs must not end up
    in a log line.
    """
    scheme, colon, target = text.partition(":")
    if not colon or scheme not in SCHEMES:
        raise SecretReferenceError(
            "not a secret reference: write scheme:target with a scheme of "
            f"{', '.join(SCHEMES)} (the text is not shown in case it is a secret)"
        )
    if scheme == "env":
        return EnvReference(_matching(_ENV_NAME, target, "env:NAME (letters, digits, _)"))
    if scheme == "file":
        if not target:
            raise SecretReferenceError("file: reference: the path is empty; write file:PATH")
        return FileReference(Path(target))
    if scheme == "keystore":
        return KeystoreReference(_matching(_SECRET_NAME, target, _KEYSTORE_NAME_RULE))
    return _parse_vault(target)


def _parse_vault(target: str) -> VaultReference:
    shape = "vault:MOUNT/PATH#FIELD, e.g. vault:secret/emp/upstream#value"
    location, hash_sign, field = target.partition("#")
    mount, slash, path = location.partition("/")
    segments = path.split("/")
    if not (hash_sign and slash and _VAULT_FIELD.fullmatch(field)):
        raise SecretReferenceError(f"vault: reference: write {shape}")
    if not all(_VAULT_SEGMENT.fullmatch(part) for part in (mount, *segments)):
        raise SecretReferenceError(
            f"vault: reference: each part of MOUNT/PATH must be a plain name (no empty, . or .. "
            f"parts); write {shape}"
        )
    return VaultReference(mount=mount, path=path, field=field)


def _matching(pattern: re.Pattern[str], target: str, shape: str) -> str:
    if not pattern.fullmatch(target):
        raise SecretReferenceError(f"malformed secret reference: write {shape}")
    return target


# --- the entry point ---------------------------------------------------------------------


def resolve(reference: str | Reference, *, settings: ProviderSettings) -> Secret:
    """The secret a reference names; an empty secret is refused (fail closed).

    Synchronous and blocking (file reads, one HTTP request to Vault): call it at start and on
    rotation, or from a thread, never on the request path.
    """
    parsed = parse_reference(reference) if isinstance(reference, str) else reference
    match parsed:
        case EnvReference():
            secret = read_env_secret(parsed)
        case FileReference():
            secret = read_file_secret(parsed)
        case KeystoreReference():
            keystore = Keystore.open(settings.keystore_file, settings.master_key_file)
            secret = keystore.get(parsed.name)
        case VaultReference():
            secret = read_vault_secret(parsed, settings=settings)
    if not secret.value:
        raise SecretError(f"{secret.source}: the secret is empty; store a value there")
    return secret


# --- env: --------------------------------------------------------------------------------


def read_env_secret(reference: EnvReference) -> Secret:
    """The variable's value, which is then deleted from os.environ: the weakest provider.

    Deleting it keeps the value out of later in-process dumps (os.environ in a debug page or
    crash report) and out of the environment of every child process started afterwards. It does
    NOT hide it from /proc/PID/environ: that file shows the environment the process was started
    with, to the same user and to root, for the life of the process. So a second read of the
    same reference in one process finds nothing; use file: or keystore: for anything rotated.
    The one place outside gateway/config.py that reads os.environ, on an explicit reference.
    """
    value = os.environ.pop(reference.name, None)
    if value is None:
        raise SecretNotFoundError(
            f"{reference}: the environment variable is not set (or was already read and removed "
            "by this process); set it before start, or use a file: or keystore: reference"
        )
    return Secret(value=value, created_at=None, version=None, source=str(reference))


# --- file: -------------------------------------------------------------------------------


def read_file_secret(reference: FileReference) -> Secret:
    """The file's text without one trailing newline; its age is its modification time."""
    content, status = read_private_file(reference.path)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{reference}: the file is not UTF-8 text") from None
    return Secret(
        value=_strip_one_newline(text),
        created_at=datetime.fromtimestamp(status.st_mtime, UTC),
        version=None,
        source=str(reference),
    )


def read_private_file(path: Path) -> tuple[bytes, os.stat_result]:
    """A file's bytes and status, refused unless it is a regular file only its owner can use.

    The checks run on the opened descriptor, so the file cannot be swapped between check and
    read. O_NOFOLLOW refuses a symlink as the last component: a link can be re-pointed by
    whoever owns it, without touching the target's permissions. O_NONBLOCK keeps a FIFO from
    blocking the open; the regular-file check then refuses it.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise SecretNotFoundError(f"{path}: no such file") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InsecureSecretFileError(
                f"{path}: is a symbolic link; refer to the file itself (a link can be re-pointed)"
            ) from None
        raise SecretError(f"{path}: cannot be opened ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        _check_private(path, status)
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read(), status
    finally:
        os.close(descriptor)


def _check_private(path: Path, status: os.stat_result) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise InsecureSecretFileError(f"{path}: not a regular file; a secret must be a plain file")
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise InsecureSecretFileError(
            f"{path}: mode {mode:04o} lets group or others access it; run `chmod 600 {path}`"
        )


def _strip_one_newline(text: str) -> str:
    """Editors and `echo` add one newline; a second one, or other whitespace, is the secret's."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


# --- keystore: ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeystoreEntry:
    """What the keystore lists about one secret: never its value."""

    name: str
    created_at: datetime
    version: int


@dataclass(frozen=True)
class _StoredEntry:
    nonce: bytes
    ciphertext: bytes
    created_at: datetime
    version: int

    def public(self, name: str) -> KeystoreEntry:
        return KeystoreEntry(name=name, created_at=self.created_at, version=self.version)

    def document(self) -> dict[str, Any]:
        return {
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
            "ciphertext": base64.b64encode(self.ciphertext).decode("ascii"),
            "created_at": self.created_at.isoformat(),
            "version": self.version,
        }


class _MasterKey:
    """The key-encryption key derived from the master key file, and its public fingerprint.

    The fingerprint (stored in the keystore) tells a wrong master key apart from a tampered
    entry; HKDF with distinct labels makes it useless for recovering the encryption key.
    """

    def __init__(self, material: bytes) -> None:
        self._aead = AESGCM(_derive(material, b"emp-gateway keystore v1: entry encryption"))
        self.key_id = _derive(material, b"emp-gateway keystore v1: key id")[:16].hex()

    def seal(self, name: str, value: str, *, created_at: datetime, version: int) -> _StoredEntry:
        nonce = os.urandom(_NONCE_BYTES)
        # The name is the associated data: an entry copied under another name fails to open.
        ciphertext = self._aead.encrypt(nonce, value.encode("utf-8"), name.encode("utf-8"))
        return _StoredEntry(nonce, ciphertext, created_at, version)

    def open(self, name: str, entry: _StoredEntry) -> str:
        """The plaintext; InvalidTag when the entry was changed or belongs to another name."""
        plaintext = self._aead.decrypt(entry.nonce, entry.ciphertext, name.encode("utf-8"))
        return plaintext.decode("utf-8")


def _derive(material: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(material)


class Keystore:
    """Named secrets in one JSON file (0600), each sealed with AES-256-GCM under the master key.

    File shape: {"format", "cipher", "master_key_id", "entries": {name: {"nonce",
    "ciphertext", "created_at", "version"}}}. Every write takes an exclusive lock beside the
    file, then replaces the file whole (temp file, fsync, rename), so a reader never sees half
    a write. Reads take no lock. Build one with `create` or `open`, never the constructor.
    """

    def __init__(self, path: Path, master_path: Path, master: _MasterKey) -> None:
        self.path = path
        self.master_path = master_path
        self._master = master

    @classmethod
    def create(
        cls, path: Path = DEFAULT_KEYSTORE_FILE, master_path: Path = DEFAULT_MASTER_KEY_FILE
    ) -> Keystore:
        """An empty keystore; also the master key (32 random bytes, 0600) unless one exists.

        An existing master key file is used as it is, so that it can be placed on another
        mount first. An existing keystore is refused: move it away to start over.
        """
        for directory in {path.parent, master_path.parent}:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with exclusive_lock(_lock_file(path)):
            if path.exists() or path.is_symlink():
                raise KeystoreError(f"{path}: a keystore exists already; open it instead")
            if not master_path.exists() and not master_path.is_symlink():
                _write_durably(master_path, os.urandom(MASTER_KEY_BYTES))
            master = _MasterKey(read_master_key(master_path))
            _write_durably(path, _dump(master.key_id, {}))
        return cls(path, master_path, master)

    @classmethod
    def open(
        cls, path: Path = DEFAULT_KEYSTORE_FILE, master_path: Path = DEFAULT_MASTER_KEY_FILE
    ) -> Keystore:
        """The existing keystore, checked against its master key; never creates either file."""
        keystore = cls(path, master_path, _MasterKey(read_master_key(master_path)))
        keystore._load()
        return keystore

    def get(self, name: str) -> Secret:
        """The latest value stored under name."""
        entry = self._entries(self._load()).get(name)
        if entry is None:
            raise SecretNotFoundError(f"{self.path}: no secret named {name!r}; put it first")
        return Secret(
            value=self._unseal(name, entry),
            created_at=entry.created_at,
            version=entry.version,
            source=str(KeystoreReference(name)),
        )

    def put(self, name: str, value: str) -> KeystoreEntry:
        """Store value under name as a new version (1 for a new name); the value is never shown."""
        _check_secret_name(name)
        if not value:
            raise KeystoreError(f"refusing to store an empty secret under {name!r}")
        with exclusive_lock(_lock_file(self.path)):
            document = self._load()
            entries = self._entries(document)
            previous = entries.get(name)
            version = 1 if previous is None else previous.version + 1
            now = datetime.now(UTC).replace(microsecond=0)
            entries[name] = self._master.seal(name, value, created_at=now, version=version)
            self._save(entries)
        return entries[name].public(name)

    def delete(self, name: str) -> None:
        """Remove name and its value; a later put of the same name starts again at version 1."""
        with exclusive_lock(_lock_file(self.path)):
            entries = self._entries(self._load())
            if entries.pop(name, None) is None:
                raise SecretNotFoundError(f"{self.path}: no secret named {name!r}")
            self._save(entries)

    def list(self) -> builtins.list[KeystoreEntry]:
        """Every name with its created_at and version, by name; values are not decrypted."""
        entries = self._entries(self._load())
        return [entries[name].public(name) for name in sorted(entries)]

    def rotate_master(self, new_master: Path | bytes) -> None:
        """Re-encrypt every entry under a new master key; values, versions and dates stay.

        bytes: the new key (32 bytes). It replaces the master key file, after the keystore is
        rewritten; until then it waits in MASTER.next, so a crash in between leaves the new
        key on disk (`open` then says so). Path: a master key file to use from now on, created
        with 32 random bytes when missing; the old file stays for you to destroy.
        Nothing is written when any entry fails authentication.
        """
        with exclusive_lock(_lock_file(self.path)):
            entries = self._entries(self._load())
            plaintexts = {name: self._unseal(name, entry) for name, entry in entries.items()}
            if isinstance(new_master, Path):
                new_path, staged = new_master, None
                if not new_master.exists() and not new_master.is_symlink():
                    new_master.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    _write_durably(new_master, os.urandom(MASTER_KEY_BYTES))
                material = read_master_key(new_master)
            else:
                new_path, staged = self.master_path, _staged_master(self.master_path)
                material = _checked_master_bytes(new_master, "the new master key")
            master = _MasterKey(material)
            if master.key_id == self._master.key_id:
                raise KeystoreError("the new master key is the current one; give a new key")
            if staged is not None:
                _write_durably(staged, material)
            resealed = {
                name: master.seal(
                    name, plaintexts[name], created_at=entry.created_at, version=entry.version
                )
                for name, entry in entries.items()
            }
            _write_durably(self.path, _dump(master.key_id, resealed))
            if staged is not None:
                staged.replace(self.master_path)
                _fsync_directory(self.master_path.parent)
            self.master_path, self._master = new_path, master

    def _unseal(self, name: str, entry: _StoredEntry) -> str:
        try:
            return self._master.open(name, entry)
        except InvalidTag:
            raise KeystoreIntegrityError(
                f"{self.path}: the entry {name!r} fails authentication: it was changed, or "
                "copied from another name; restore the keystore from a backup or put it again"
            ) from None

    def _load(self) -> dict[str, Any]:
        """The keystore document, checked for its shape and its master key."""
        try:
            content, _ = read_private_file(self.path)
        except SecretNotFoundError:
            raise KeystoreError(f"{self.path}: no keystore; {_CREATE_HINT}") from None
        try:
            document = json.loads(content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeystoreError(f"{self.path}: not a keystore (not JSON)") from None
        if not isinstance(document, dict) or document.get("format") != _FORMAT:
            raise KeystoreError(f"{self.path}: not a keystore of format {_FORMAT}")
        if not isinstance(document.get("entries"), dict):
            raise KeystoreError(f"{self.path}: `entries` is missing or not an object")
        if document.get("master_key_id") != self._master.key_id:
            raise WrongMasterKeyError(self._wrong_master_message())
        return document

    def _wrong_master_message(self) -> str:
        message = f"{self.master_path} does not open {self.path}: another master key sealed it"
        staged = _staged_master(self.master_path)
        if staged.exists():
            message += (
                f"; {staged} exists, so a master rotation was interrupted: "
                f"move {staged} over {self.master_path}"
            )
        return message

    def _entries(self, document: dict[str, Any]) -> dict[str, _StoredEntry]:
        entries: dict[str, _StoredEntry] = {}
        for name, raw in document["entries"].items():
            entries[name] = self._parse_entry(name, raw)
        return entries

    def _parse_entry(self, name: str, raw: Any) -> _StoredEntry:
        where = f"{self.path}: entries.{name}"
        if not isinstance(raw, dict):
            raise KeystoreError(f"{where} is not an object")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise KeystoreError(f"{where}.version must be a positive integer")
        try:
            nonce = base64.b64decode(raw["nonce"], validate=True)
            ciphertext = base64.b64decode(raw["ciphertext"], validate=True)
            created_at = datetime.fromisoformat(raw["created_at"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise KeystoreError(
                f"{where} needs nonce and ciphertext (base64) and created_at (ISO 8601)"
            ) from None
        return _StoredEntry(nonce, ciphertext, created_at, version)

    def _save(self, entries: dict[str, _StoredEntry]) -> None:
        _write_durably(self.path, _dump(self._master.key_id, entries))


def read_master_key(path: Path) -> bytes:
    """The 32 bytes of a master key file (regular, 0600, not a symlink)."""
    try:
        content, _ = read_private_file(path)
    except SecretNotFoundError:
        raise KeystoreError(f"{path}: no master key file; {_CREATE_HINT}") from None
    return _checked_master_bytes(content, str(path))


def _checked_master_bytes(material: bytes, what: str) -> bytes:
    if len(material) != MASTER_KEY_BYTES:
        raise KeystoreError(
            f"{what}: a master key is exactly {MASTER_KEY_BYTES} bytes, not {len(material)}"
        )
    return material


def _check_secret_name(name: str) -> None:
    if not _SECRET_NAME.fullmatch(name):
        raise KeystoreError(f"bad secret name: write {_KEYSTORE_NAME_RULE}")


def _dump(key_id: str, entries: dict[str, _StoredEntry]) -> bytes:
    document = {
        "format": _FORMAT,
        "cipher": _CIPHER,
        "master_key_id": key_id,
        "entries": {name: entries[name].document() for name in sorted(entries)},
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _staged_master(master_path: Path) -> Path:
    return master_path.with_name(master_path.name + ".next")


def _write_durably(path: Path, data: bytes) -> None:
    """Replace path whole (0600, fsync'd), then fsync its directory so the rename survives too.

    The directory fsync orders a master rotation: the keystore's new name is on disk before
    the master key file changes.
    """
    write_private(path, data)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- vault: ------------------------------------------------------------------------------


def read_vault_secret(reference: VaultReference, *, settings: ProviderSettings) -> Secret:
    """The field of the latest version of a KV v2 secret, with its version and created_time.

    Errors name the reference and the address, never the token.
    """
    import hvac.exceptions  # noqa: PLC0415 - only vault: references pay for hvac and requests

    vault = settings.vault
    if vault is None:
        raise VaultError(f"{reference}: no Vault is configured; set its address and token")
    _check_vault_address(vault.address)  # before the token is even read
    client = _vault_client(vault, token=_vault_token(vault, settings))
    where = f"{reference}: Vault at {vault.address}"
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=reference.path, mount_point=reference.mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        raise SecretNotFoundError(
            f"{where} has no secret there, or its latest version is deleted "
            f"(is {reference.mount} a KV version 2 mount?)"
        ) from None
    except hvac.exceptions.Forbidden:
        raise VaultError(
            f"{where} refused the token (403 permission denied): it may be expired or revoked, "
            f"or its policy lacks read on {reference.mount}/data/{reference.path}"
        ) from None
    except hvac.exceptions.VaultError as error:
        raise VaultError(f"{where} answered with an error ({type(error).__name__})") from None
    except OSError as error:  # requests' exceptions are OSErrors: refused, timeout, TLS
        raise VaultError(f"{where} is unreachable ({type(error).__name__})") from None
    finally:
        client.adapter.close()
    return _kv2_secret(reference, response, where)


def _vault_token(vault: VaultSettings, settings: ProviderSettings) -> str:
    token_reference = parse_reference(vault.token)
    if isinstance(token_reference, VaultReference):
        raise SecretReferenceError("the Vault token cannot be a vault: reference; use file:")
    return resolve(token_reference, settings=settings).value


def _vault_client(vault: VaultSettings, *, token: str) -> hvac.Client:
    import hvac  # noqa: PLC0415 - see read_vault_secret

    client = hvac.Client(
        url=vault.address,
        token=token,
        verify=str(vault.ca_file) if vault.ca_file is not None else True,
        timeout=vault.timeout_seconds,
        namespace=vault.namespace,
        # requests copies X-Vault-Token onto a redirect to any host: never follow one.
        allow_redirects=False,
    )
    # No proxy or CA bundle from the environment (HTTPS_PROXY, REQUESTS_CA_BUNDLE): the
    # settings alone decide where the token goes and which certificate is trusted.
    client.adapter.session.trust_env = False
    return client


def _check_vault_address(address: str) -> None:
    parts = urlsplit(address)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    raise VaultError(
        f"Vault address {address!r}: use https://HOST[:PORT]; plain http is allowed only to a "
        "loopback address, where the token does not cross a network"
    )


def _is_loopback(hostname: str | None) -> bool:
    if hostname == "localhost":
        return True
    try:
        return hostname is not None and ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def _kv2_secret(reference: VaultReference, response: Any, where: str) -> Secret:
    """The Secret in a KV v2 read answer: {"data": {"data": {...}, "metadata": {...}}}."""
    data = response.get("data") if isinstance(response, dict) else None
    fields = data.get("data") if isinstance(data, dict) else None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(fields, dict) or not isinstance(metadata, dict):
        status = getattr(response, "status_code", None)
        raise VaultError(f"{where}: the answer is not a KV v2 secret (HTTP status {status})")
    if reference.field not in fields:
        raise SecretNotFoundError(
            f"{reference}: the secret has no field {reference.field!r}; "
            f"its fields are {sorted(fields)}"
        )
    value = fields[reference.field]
    if not isinstance(value, str):
        raise VaultError(f"{reference}: the field is a JSON {type(value).__name__}, not a string")
    version = metadata.get("version")
    return Secret(
        value=value,
        created_at=_vault_time(metadata.get("created_time")),
        version=version if isinstance(version, int) else None,
        source=str(reference),
    )


def _vault_time(text: Any) -> datetime | None:
    """RFC 3339 with nanoseconds ("2026-01-02T03:04:05.123456789Z"); None when absent or odd."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)  # 3.11+: takes "Z" and drops digits past micros
    except ValueError:
        return None
