"""TOTP second factor: sealed secrets, code checks with a replay guard, recovery codes, QR codes.

TOTP secrets are stored sealed (AES-256-GCM, bound to their account); this module never logs a
secret, a code or the sealing key, and never puts one in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import secrets
import time
from typing import TYPE_CHECKING

import pyotp
import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from empsecrets.files import write_private
from gateway.identity.state import account_key

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from gateway.identity.state import StateStore

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits: the GCM nonce size NIST SP 800-38D recommends
TAG_BYTES = 16
SEALED_PREFIX = "v1."
RECOVERY_CODE_CHARS = 16  # 80 bits of base32
_BASE32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_KEY_HINT = "`gateway setup` creates it"


def new_sealing_key() -> str:
    """A new sealing key as its reader expects it: 32 random bytes, base64url."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def ensure_key_file(path: Path) -> bool:
    """Create the sealing key file (32 random bytes, base64, 0600) unless it exists; True if so."""
    if path.exists():
        return False
    write_private(path, new_sealing_key() + "\n")
    return True


class SecretBox:
    """AES-256-GCM sealing of small secrets, each bound to a context (the AAD).

    The context names what the value belongs to ("totp:alice"), so a sealed value copied into
    another account's row does not open there.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a SecretBox key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """The box for the key in path; a missing, short or garbled key refuses to start."""
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: sealing key file missing; {_KEY_HINT}") from None
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path}: sealing key is not base64 text; {_KEY_HINT}") from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_text(cls, text: str, source: str) -> SecretBox:
        """The box for a key in base64 text from source (a file or a secret reference).

        A short or garbled key raises ValueError naming source, never the text.
        """
        try:
            key = base64.b64decode(text.strip(), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{source}: sealing key is not base64 text; {_KEY_HINT}") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"{source}: sealing key must be {KEY_BYTES} bytes; {_KEY_HINT}")
        return cls(key)

    def seal(self, plaintext: bytes, *, context: str) -> str:
        """Encrypt and authenticate plaintext for context: "v1." + base64url(nonce + ciphertext)."""
        # A random 96-bit nonce per seal: safe for far more than the 2**32 seals per key NIST
        # allows, and this box seals one value per MFA enrolment.
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode("utf-8"))
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")

    def open(self, sealed: str, *, context: str) -> bytes:
        """The plaintext; ValueError when the value was altered or sealed for another context."""
        if not sealed.startswith(SEALED_PREFIX):
            raise ValueError("sealed value has an unknown format (expected v1.)")
        body = sealed[len(SEALED_PREFIX) :]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("sealed value is not base64url") from None
        if len(raw) < NONCE_BYTES + TAG_BYTES:
            raise ValueError("sealed value is too short")
        try:
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode("utf-8"))
        except InvalidTag:
            raise ValueError("sealed value does not open: altered, or sealed elsewhere") from None


def new_totp_secret() -> str:
    """A new TOTP secret: 32 base32 characters, 160 bits (RFC 4226 section 4 recommends 160)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, username: str, issuer_name: str) -> str:
    """The otpauth://totp/ URI an authenticator app reads from the enrolment QR code."""
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer_name)


def qr_svg(uri: str) -> str:
    """The URI as an inline SVG QR code (no XML declaration, so it embeds in HTML)."""
    buffer = io.BytesIO()
    segno.make(uri, error="m").save(buffer, kind="svg", scale=4, xmldecl=False)
    return buffer.getvalue().decode("utf-8")


def qr_text(uri: str) -> str:
    """The URI as a QR code drawn with block characters, two modules per line, for a terminal."""
    buffer = io.StringIO()
    segno.make(uri, error="m").terminal(out=buffer, compact=True)
    return buffer.getvalue()


class TotpVerifier:
    """RFC 6238 codes, accepted at most once each: a used code is refused as a replay.

    window is how many periods either side of now are accepted (clock drift, slow typing).
    Errors of the state store propagate: the caller must refuse the login (fail closed).
    """

    def __init__(
        self,
        state: StateStore,
        *,
        period: int = 30,
        digits: int = 6,
        window: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if period < 1 or digits not in {6, 7, 8} or window < 0:
            raise ValueError("TotpVerifier: period >= 1, digits 6..8 and window >= 0")
        self._state = state
        self._period = period
        self._digits = digits
        self._window = window
        self._clock = clock
        # A guard must outlive every period in which its code is still accepted.
        self._guard_ttl = float(period * (2 * window + 2))

    async def verify(self, account: str, secret: str, code: str) -> bool:
        """Whether code is a current code for secret that was not used before by account."""
        if len(code) != self._digits or not (code.isascii() and code.isdigit()):
            return False
        timecode = self._matching_timecode(secret, code)
        if timecode is None:
            return False
        tag = account_key(account)
        # RFC 6238 section 5.2: once a code was used, no code of that or an earlier period is
        # accepted, so an older code still inside the window cannot be replayed either.
        last = await self._state.get(f"totp-last:{tag}")
        if last is not None and timecode <= int(last):
            return False
        # Atomic claim: of two concurrent logins with one code (a phished code raced against
        # its owner), exactly one wins.
        if not await self._state.set_if_absent(f"totp-used:{tag}:{timecode}", "1", self._guard_ttl):
            return False
        await self._state.set(f"totp-last:{tag}", str(timecode), self._guard_ttl)
        return True

    def _matching_timecode(self, secret: str, code: str) -> int | None:
        totp = pyotp.TOTP(secret, digits=self._digits, interval=self._period)
        now = int(self._clock()) // self._period
        matched = None
        for timecode in range(now - self._window, now + self._window + 1):
            # No early exit: the time taken does not tell which period matched.
            candidate = totp.generate_otp(timecode)
            if hmac.compare_digest(candidate, code) and matched is None:
                matched = timecode
        return matched


def new_recovery_codes(count: int = 10) -> list[str]:
    """Distinct one-time recovery codes, 80 random bits each, written xxxx-xxxx-xxxx-xxxx."""
    codes: list[str] = []
    while len(codes) < count:
        chars = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        code = "-".join(chars[i : i + 4] for i in range(0, RECOVERY_CODE_CHARS, 4))
        if code not in codes:
            codes.append(code)
    return codes


def normalise_recovery_code(text: str) -> str | None:
    """The 16 base32 characters of a typed recovery code, or None if it cannot be one."""
    normalised = text.strip().lower().replace("-", "").replace(" ", "")
    if len(normalised) != RECOVERY_CODE_CHARS or not set(normalised) <= _BASE32_ALPHABET:
        return None
    return normalised


def recovery_code_hash(code: str) -> str:
    """The stored form of a recovery code: SHA-256 hex of its normalised text.

    A fast unsalted hash is sound here, unlike for passwords: each code carries 80 random bits,
    so neither a dictionary nor brute force over the hash is feasible.
    """
    normalised = normalise_recovery_code(code)
    if normalised is None:
        raise ValueError("not a recovery code (16 base32 characters)")
    return hashlib.sha256(normalised.encode("ascii")).hexdigest()
