"""TOTP second factor: sealed secrets, once-only codes within the window, recovery codes, QR."""

from __future__ import annotations

import base64
import stat
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from gateway.identity.mfa import (
    SecretBox,
    TotpVerifier,
    ensure_key_file,
    new_recovery_codes,
    new_totp_secret,
    normalise_recovery_code,
    provisioning_uri,
    qr_svg,
    qr_text,
    recovery_code_hash,
)
from gateway.identity.state import MemoryStateStore, StateStoreError

NOW = 1_700_000_010.0  # 10 s into a 30 s period, so "now" cannot slip into the next one


class FixedClock:
    """A clock the test sets; the verifier reads it instead of time.time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    key_file = tmp_path / "secrets" / "totp.key"
    assert ensure_key_file(key_file)
    return SecretBox.from_file(key_file)


def verifier(clock: FixedClock | None = None, **options: int) -> TotpVerifier:
    return TotpVerifier(MemoryStateStore(), clock=clock or FixedClock(NOW), **options)


# --- SecretBox ---------------------------------------------------------------------------------


def test_sealed_secret_opens_with_its_context(box: SecretBox):
    """A sealed value opens to the same bytes under the context it was sealed for."""
    sealed = box.seal(b"JBSWY3DPEHPK3PXP", context="totp:alice")
    assert sealed.startswith("v1.")
    assert "JBSWY3DP" not in sealed
    assert box.open(sealed, context="totp:alice") == b"JBSWY3DPEHPK3PXP"


def test_two_seals_of_one_value_differ(box: SecretBox):
    """Each seal uses a fresh nonce, so equal secrets do not show as equal ciphertexts."""
    assert box.seal(b"same", context="totp:a") != box.seal(b"same", context="totp:a")


def test_flipped_byte_does_not_open(box: SecretBox):
    """Altering any byte of the sealed value makes open() refuse it."""
    sealed = box.seal(b"secret", context="totp:alice")
    raw = bytearray(base64.urlsafe_b64decode(sealed[3:] + "=" * (-len(sealed[3:]) % 4)))
    for index in (0, 12, len(raw) - 1):  # nonce, ciphertext, tag
        altered = bytearray(raw)
        altered[index] ^= 0x01
        text = "v1." + base64.urlsafe_b64encode(bytes(altered)).decode().rstrip("=")
        with pytest.raises(ValueError, match="does not open"):
            box.open(text, context="totp:alice")


def test_secret_copied_to_another_user_does_not_open(box: SecretBox):
    """A value sealed for alice does not open as bob's (the context is authenticated)."""
    sealed = box.seal(b"secret", context="totp:alice")
    with pytest.raises(ValueError, match="does not open"):
        box.open(sealed, context="totp:bob")


@pytest.mark.parametrize(
    "sealed",
    [
        pytest.param("v2.AAAA", id="unknown-version"),
        pytest.param("v1.!!!!", id="not-base64url"),
        pytest.param("v1.AAAA", id="too-short"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_sealed_value_is_refused(box: SecretBox, sealed: str):
    """Values that are not a v1 sealed box raise ValueError rather than decrypting garbage."""
    with pytest.raises(ValueError, match="sealed value"):
        box.open(sealed, context="totp:alice")


def test_key_file_is_created_0600_once(tmp_path: Path):
    """ensure_key_file writes 32 random bytes owner-only and leaves an existing key alone."""
    key_file = tmp_path / "totp.key"
    assert ensure_key_file(key_file)
    first = key_file.read_bytes()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(base64.urlsafe_b64decode(first.strip())) == 32
    assert not ensure_key_file(key_file)
    assert key_file.read_bytes() == first


def test_missing_key_file_is_refused_with_the_fix(tmp_path: Path):
    """A missing key file names its path and says `gateway setup` creates it."""
    key_file = tmp_path / "absent.key"
    with pytest.raises(FileNotFoundError, match="gateway setup") as caught:
        SecretBox.from_file(key_file)
    assert str(key_file) in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(base64.b64encode(b"k" * 16) + b"\n", id="short-key"),
        pytest.param(b"not base64 at all!!\n", id="garbled"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00", id="binary"),
    ],
)
def test_unusable_key_file_is_refused(tmp_path: Path, content: bytes):
    """A short, garbled or empty key refuses to start, naming the path and not the content."""
    key_file = tmp_path / "totp.key"
    key_file.write_bytes(content)
    with pytest.raises(ValueError, match="gateway setup") as caught:
        SecretBox.from_file(key_file)
    assert str(key_file) in str(caught.value)
    if content.strip():
        assert content.strip().decode(errors="ignore") not in str(caught.value)


def test_repr_does_not_show_the_key(box: SecretBox):
    """Printing a SecretBox (a log line, a traceback's locals) shows no key material."""
    assert repr(box) == "SecretBox(<key hidden>)"


# --- TOTP --------------------------------------------------------------------------------------


async def test_current_code_is_accepted_once():
    """A code from the authenticator app verifies, and the same code a second time is a replay."""
    secret = new_totp_secret()
    totp = verifier()
    code = pyotp.TOTP(secret).at(NOW)
    assert await totp.verify("alice", secret, code)
    assert not await totp.verify("alice", secret, code)


async def test_replay_is_refused_later_in_the_window():
    """The same code replayed in the next period (still inside the window) is refused."""
    secret = new_totp_secret()
    clock = FixedClock(NOW)
    totp = verifier(clock)
    code = pyotp.TOTP(secret).at(NOW)
    assert await totp.verify("alice", secret, code)
    clock.now = NOW + 30
    assert not await totp.verify("alice", secret, code)


async def test_an_older_code_is_refused_once_a_newer_one_was_used():
    """RFC 6238 5.2: after the current code, the previous period's (still in window) fails."""
    secret = new_totp_secret()
    totp = verifier()
    generator = pyotp.TOTP(secret)
    assert await totp.verify("alice", secret, generator.at(NOW))
    assert not await totp.verify("alice", secret, generator.at(NOW - 30))
    assert await verifier().verify("alice", secret, generator.at(NOW - 30))  # fresh state: ok


async def test_replay_guard_ignores_account_case():
    """Alice and ALICE are one account for the replay guard."""
    secret = new_totp_secret()
    totp = verifier()
    code = pyotp.TOTP(secret).at(NOW)
    assert await totp.verify("alice", secret, code)
    assert not await totp.verify("ALICE", secret, code)


@pytest.mark.parametrize(
    ("offset_periods", "accepted"),
    [
        pytest.param(-1, True, id="previous-period-accepted"),
        pytest.param(1, True, id="next-period-accepted"),
        pytest.param(-2, False, id="two-periods-ago-refused"),
        pytest.param(-3, False, id="three-periods-ago-refused"),
        pytest.param(3, False, id="three-periods-ahead-refused"),
    ],
)
async def test_codes_are_accepted_only_within_the_window(offset_periods: int, accepted: bool):
    """With window=1, codes of the adjacent periods pass and older or newer ones do not."""
    secret = new_totp_secret()
    code = pyotp.TOTP(secret).at(NOW + 30 * offset_periods)
    assert await verifier(window=1).verify("alice", secret, code) is accepted


async def test_window_zero_accepts_only_the_current_period():
    """window=0 refuses the previous period's code."""
    secret = new_totp_secret()
    totp = verifier(window=0)
    assert not await totp.verify("alice", secret, pyotp.TOTP(secret).at(NOW - 30))
    assert await totp.verify("alice", secret, pyotp.TOTP(secret).at(NOW))


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda code: code[:5], id="too-short"),
        pytest.param(lambda code: code + "0", id="too-long"),
        pytest.param(lambda code: code[:5] + "a", id="letter"),
        pytest.param(lambda code: f" {code}", id="leading-space"),
        pytest.param(lambda code: code[:3] + " " + code[3:5], id="inner-space"),
        pytest.param(lambda code: "".join(chr(0xFF10 + int(c)) for c in code), id="fullwidth"),
        pytest.param(lambda code: "", id="empty"),
    ],
)
async def test_malformed_codes_are_refused(mangle):
    """Anything but exactly six ASCII digits is refused without looking at the secret."""
    secret = new_totp_secret()
    code = pyotp.TOTP(secret).at(NOW)
    totp = verifier()
    assert not await totp.verify("alice", secret, mangle(code))
    assert await totp.verify("alice", secret, code)  # the real code was not used up


async def test_wrong_code_is_refused():
    """A six-digit code that is not the secret's code is refused."""
    secret = new_totp_secret()
    right = pyotp.TOTP(secret).at(NOW)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert not await verifier(window=0).verify("alice", secret, wrong)


async def test_accounts_do_not_block_each_other():
    """Two accounts with the same secret and timecode each get their code accepted once."""
    secret = new_totp_secret()
    totp = verifier()
    code = pyotp.TOTP(secret).at(NOW)
    assert await totp.verify("alice", secret, code)
    assert await totp.verify("bob", secret, code)
    assert not await totp.verify("bob", secret, code)


async def test_state_store_errors_propagate():
    """A failing replay guard raises, so the caller refuses the login (fail closed)."""
    state = MemoryStateStore(max_keys=1)
    totp = TotpVerifier(state, clock=FixedClock(NOW))
    await state.set("occupied", "1", 600)
    secret = new_totp_secret()
    with pytest.raises(StateStoreError):
        await totp.verify("alice", secret, pyotp.TOTP(secret).at(NOW))


def test_new_secret_is_160_bit_base32():
    """New secrets are 32 base32 characters (160 bits) and differ each time."""
    secret = new_totp_secret()
    assert len(secret) == 32
    assert len(base64.b32decode(secret)) == 20
    assert new_totp_secret() != secret


def test_provisioning_uri_names_issuer_and_account():
    """The otpauth URI carries the secret, the issuer label and the account name."""
    secret = new_totp_secret()
    uri = provisioning_uri(secret, "alice@example.org", "EMP gateway")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert unquote(parts.path) == "/EMP gateway:alice@example.org"
    query = parse_qs(parts.query)
    assert query["secret"] == [secret]
    assert query["issuer"] == ["EMP gateway"]
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.at(NOW) == pyotp.TOTP(secret).at(NOW)


def test_qr_svg_is_inline_svg():
    """The enrolment QR code is SVG text without an XML declaration, ready to embed in HTML."""
    svg = qr_svg(provisioning_uri(new_totp_secret(), "alice", "EMP gateway"))
    assert svg.startswith("<svg")
    assert svg.rstrip().endswith("</svg>")
    assert "<?xml" not in svg


def test_qr_text_is_compact_block_art():
    """The terminal QR code uses half-block characters, two modules per text line."""
    text = qr_text(provisioning_uri(new_totp_secret(), "alice", "EMP gateway"))
    lines = text.splitlines()
    assert {"▀", "▄"} & set(text)
    assert len(lines) < len(lines[0])  # compact: fewer lines than columns


# --- Recovery codes ----------------------------------------------------------------------------


def test_recovery_codes_are_unique_and_well_formed():
    """Ten codes by default, each xxxx-xxxx-xxxx-xxxx in lowercase base32, none repeated."""
    codes = new_recovery_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4, 4, 4, 4]
        assert normalise_recovery_code(code) == code.replace("-", "")
    assert len(new_recovery_codes(3)) == 3


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        pytest.param("ABCD EFGH-ijkl-mnop", "abcdefghijklmnop", id="mixed-separators-and-case"),
        pytest.param("  abcd-efgh-ijkl-mnop\n", "abcdefghijklmnop", id="surrounding-whitespace"),
        pytest.param("abcdefgh234567ab", "abcdefgh234567ab", id="no-separators"),
        pytest.param("abcd-efgh-ijkl-mno", None, id="too-short"),
        pytest.param("abcd-efgh-ijkl-mnopq", None, id="too-long"),
        pytest.param("abcd-efgh-ijkl-mn01", None, id="not-base32-digits"),
        pytest.param("abcd_efgh_ijkl_mnop", None, id="underscores"),
        pytest.param("", None, id="empty"),
    ],
)
def test_typed_recovery_codes_are_normalised(typed: str, expected: str | None):
    """Case, dashes and spaces do not matter; anything else that is not 16 base32 chars is None."""
    assert normalise_recovery_code(typed) == expected


def test_recovery_code_hash_is_stable_across_spellings():
    """The stored hash is the same however the user types the code, and differs between codes."""
    first, second = new_recovery_codes(2)
    assert recovery_code_hash(first) == recovery_code_hash(first.upper().replace("-", " "))
    assert recovery_code_hash(first) != recovery_code_hash(second)
    assert len(recovery_code_hash(first)) == 64
    assert recovery_code_hash("abcd-efgh-ijkl-mnop") == (
        "f39dac6cbaba535e2c207cd0cd8f154974223c848f727f98b3564cea569b41cf"
    )


def test_recovery_code_hash_refuses_non_codes():
    """Hashing something that cannot be a recovery code is a bug in the caller: ValueError."""
    with pytest.raises(ValueError, match="not a recovery code"):
        recovery_code_hash("hunter2")
