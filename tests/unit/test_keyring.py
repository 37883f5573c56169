"""The built-in issuer's key ring: rotation on disk, overlap of old and new keys, reloads."""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from jwcrypto import jwk
from structlog.testing import capture_logs

from empsecrets import files
from empsecrets.files import write_private
from gateway import keys
from gateway.keyring import (
    Algorithm,
    KeyRing,
    KeyRingSource,
    ensure_keyring,
    generate_key,
    keyring_path,
    load_keyring,
    plan_rotation,
    rotate,
)

ALLOWED = frozenset({"RS256", "ES256", "EdDSA"})
RETIRE_AFTER = 86_400 + 30  # issuer.max_ttl_seconds + authn.leeway_seconds
ISSUER = "https://localhost:8443"
AUDIENCE = "emp-api"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}
REPO = Path(__file__).resolve().parents[2]


def ring_for(key_dir: Path) -> KeyRing:
    ring = KeyRing(key_dir, allowed_algorithms=ALLOWED, retire_after_seconds=RETIRE_AFTER)
    ring.load()
    return ring


def mint(private: dict[str, Any]) -> str:
    return keys.mint_token(
        private, issuer=ISSUER, audience=AUDIENCE, subject="alice", roles=["reader"], ttl_seconds=60
    )


async def verify(source: KeyRingSource, token: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = await source.key(kid)
    assert key is not None, f"no key for kid {kid}"
    claims: dict[str, Any] = jwt.decode(
        token, key=key, algorithms=[key.algorithm_name], audience=AUDIENCE, issuer=ISSUER
    )
    return claims


def kids(document: dict[str, Any]) -> list[str]:
    return [entry["kid"] for entry in document["keys"]]


def private_values(key_dir: Path) -> list[str]:
    return [entry["d"] for entry in load_keyring(key_dir)]


@pytest.fixture(params=["EdDSA", "ES256"])
def algorithm(request: pytest.FixtureRequest) -> Algorithm:
    return cast("Algorithm", request.param)


@pytest.fixture
def key_dir(tmp_path: Path, algorithm: Algorithm) -> Path:
    directory = tmp_path / "keys"
    assert ensure_keyring(directory, algorithm)
    return directory


# --- The file ----------------------------------------------------------------------------------


def test_existing_single_key_file_loads(tmp_path: Path):
    """A file written by `gateway keys init` before rotation existed loads as one active key."""
    key = jwk.JWK.generate(kty="OKP", crv="Ed25519")  # the pre-rotation format, as written then
    entry = key.export(private_key=True, as_dict=True)
    entry.update(kid=key.thumbprint(), alg="EdDSA", use="sig", created_at=int(time.time()))
    files.write_private(keyring_path(tmp_path), json.dumps({"keys": [entry]}))
    legacy = json.loads(keyring_path(tmp_path).read_text())
    loaded = load_keyring(tmp_path)
    assert loaded == legacy["keys"]
    ring = ring_for(tmp_path)
    assert ring.active["kid"] == legacy["keys"][0]["kid"]
    assert kids(ring.public_jwks()) == [legacy["keys"][0]["kid"]]
    assert 0 <= ring.active_age_seconds < 60


def test_ensure_keyring_creates_once_owner_only(tmp_path: Path, algorithm: Algorithm):
    """The key file is created 0600 with one key of the configured algorithm, then left alone."""
    key_dir = tmp_path / "keys"
    assert ensure_keyring(key_dir, algorithm)
    before = keyring_path(key_dir).read_bytes()
    assert not ensure_keyring(key_dir, algorithm)
    assert keyring_path(key_dir).read_bytes() == before
    assert stat.S_IMODE(keyring_path(key_dir).stat().st_mode) == 0o600
    (entry,) = load_keyring(key_dir)
    assert entry["alg"] == algorithm
    assert entry["use"] == "sig"
    assert "retired_at" not in entry


def test_kid_is_the_rfc7638_thumbprint(algorithm: Algorithm):
    """A new key's kid is the thumbprint of its public key, so it names the key, not a counter."""
    from jwcrypto import jwk  # noqa: PLC0415

    entry = generate_key(algorithm)
    public = {k: v for k, v in entry.items() if k in {"kty", "crv", "x", "y"}}
    assert entry["kid"] == jwk.JWK(**public).thumbprint()


def broken_documents() -> list[Any]:
    active = generate_key("EdDSA", now=1000)
    public_only = {k: v for k, v in active.items() if k != "d"}
    return [
        pytest.param(b"{not json", "gateway keys init", id="garbled"),
        pytest.param(b"\xff\xfe", "gateway keys init", id="binary"),
        pytest.param({"keys": []}, "gateway keys init", id="empty-set"),
        pytest.param([], "gateway keys init", id="not-an-object"),
        pytest.param(
            {"keys": [{**active, "retired_at": 2000}]}, "gateway keys rotate", id="active-retired"
        ),
        pytest.param({"keys": [public_only]}, "not a usable private", id="public-only"),
        pytest.param(
            {"keys": [{**active, "alg": "HS256"}]}, "alg must be one of", id="symmetric-alg"
        ),
        pytest.param({"keys": [{**active, "alg": "ES256"}]}, "needs kty EC", id="alg-kty-mismatch"),
        pytest.param({"keys": [active, active]}, "duplicate kid", id="duplicate-kid"),
        pytest.param(
            {"keys": [{**active, "created_at": "yesterday"}]}, "epoch seconds", id="bad-created-at"
        ),
        pytest.param(
            {"keys": [{**active, "d": "!!"}]}, "not a usable private", id="bad-private-member"
        ),
    ]


@pytest.mark.parametrize(("content", "message"), broken_documents())
def test_unusable_file_is_refused_naming_the_path(tmp_path: Path, content: Any, message: str):
    """A file that cannot be a key ring is refused with its path and the fix, never key material."""
    path = keyring_path(tmp_path)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as caught:
        load_keyring(tmp_path)
    assert str(path) in str(caught.value)
    if isinstance(content, dict):
        for entry in content["keys"]:
            assert str(entry.get("d", "<none>")) not in str(caught.value)


def test_missing_file_is_refused_with_the_fix(tmp_path: Path):
    """No key file: the error names the path and `gateway keys init`."""
    with pytest.raises(FileNotFoundError, match="gateway keys init") as caught:
        load_keyring(tmp_path)
    assert str(keyring_path(tmp_path)) in str(caught.value)
    ring = KeyRing(tmp_path, allowed_algorithms=ALLOWED, retire_after_seconds=RETIRE_AFTER)
    with pytest.raises(FileNotFoundError, match="gateway keys init"):
        ring.load()
    assert not ring.loaded


def test_active_algorithm_must_be_allowed(key_dir: Path, algorithm: Algorithm):
    """A ring whose active key the verifier would refuse stops the start, naming the setting."""
    other_algorithms = ALLOWED - {algorithm}
    ring = KeyRing(key_dir, allowed_algorithms=other_algorithms, retire_after_seconds=RETIRE_AFTER)
    with pytest.raises(ValueError, match=r"authn\.allowed_algorithms"):
        ring.load()


# --- Rotation ----------------------------------------------------------------------------------


def test_rotate_adds_an_active_key_and_keeps_the_old_one(key_dir: Path, algorithm: Algorithm):
    """After a rotation the new key signs and the old one is retired but still published."""
    (old,) = load_keyring(key_dir)
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    assert plan.retired_kids == (old["kid"],)
    assert plan.dropped_kids == ()
    new, retired = load_keyring(key_dir)
    assert new["kid"] == plan.new_kid != old["kid"]
    assert "retired_at" not in new
    assert retired["kid"] == old["kid"]
    assert retired["d"] == old["d"]
    assert retired["retired_at"] == plan.now
    ring = ring_for(key_dir)
    assert ring.active["kid"] == plan.new_kid
    assert kids(ring.public_jwks()) == [plan.new_kid, old["kid"]]


def test_rotated_file_is_owner_only(key_dir: Path, algorithm: Algorithm):
    """The key file is 0600 after a rotation rewrote it."""
    rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    assert stat.S_IMODE(keyring_path(key_dir).stat().st_mode) == 0o600


def test_dry_run_writes_nothing_but_returns_the_plan(key_dir: Path, algorithm: Algorithm):
    """dry_run leaves the file byte for byte as it was and still says what would happen."""
    before = keyring_path(key_dir).read_bytes()
    (old,) = load_keyring(key_dir)
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=True)
    assert keyring_path(key_dir).read_bytes() == before
    assert plan.retired_kids == (old["kid"],)
    assert [entry["kid"] for entry in plan.keys] == [plan.new_kid, old["kid"]]


def test_rotation_can_change_the_algorithm(key_dir: Path, algorithm: Algorithm):
    """Rotating to the other algorithm makes a key of that kind active; the old kind verifies on."""
    other: Algorithm = "ES256" if algorithm == "EdDSA" else "EdDSA"
    plan = rotate(key_dir, algorithm=other, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    ring = ring_for(key_dir)
    assert ring.active["alg"] == other
    assert {k.algorithm_name for k in ring.verification_keys().values()} == {algorithm, other}
    assert plan.public_summary()["keys"][0]["alg"] == other


def test_retired_key_is_dropped_once_its_tokens_expired(key_dir: Path, algorithm: Algorithm):
    """Past retire_after the old key leaves the published JWKS, and the next rotation drops it."""
    (old,) = load_keyring(key_dir)
    t0 = int(time.time())
    first = rotate(
        key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False, now=t0
    )
    ring = ring_for(key_dir)
    assert old["kid"] in kids(ring.public_jwks(now=t0 + RETIRE_AFTER))
    assert old["kid"] in ring.verification_keys(now=t0 + RETIRE_AFTER)
    later = t0 + RETIRE_AFTER + 1
    assert kids(ring.public_jwks(now=later)) == [first.new_kid]
    assert list(ring.verification_keys(now=later)) == [first.new_kid]
    assert ring.verification_key(old["kid"], now=later) is None
    second = rotate(
        key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False, now=later
    )
    assert second.dropped_kids == (old["kid"],)
    assert second.retired_kids == (first.new_kid,)
    assert [e["kid"] for e in load_keyring(key_dir)] == [second.new_kid, first.new_kid]


def test_plan_retires_unmarked_older_keys(algorithm: Algorithm):
    """Older keys of a pre-rotation file that lack retired_at are retired now, not kept active."""
    active = generate_key(algorithm, now=100)
    older = generate_key(algorithm, now=50)
    plan = plan_rotation([active, older], algorithm=algorithm, now=200, retire_after_seconds=10)
    assert plan.retired_kids == (active["kid"], older["kid"])
    assert [e.get("retired_at") for e in plan.keys] == [None, 200, 200]
    assert "retired_at" not in active  # the caller's list is not changed


def test_plan_shows_no_private_material(key_dir: Path, algorithm: Algorithm):
    """The plan's summary and repr name kids, algorithms and ages but never a private member."""
    rotate(
        key_dir,
        algorithm=algorithm,
        retire_after_seconds=RETIRE_AFTER,
        dry_run=False,
        now=int(time.time()) - 100,
    )
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=True)
    summary = plan.public_summary()
    shown = json.dumps(summary) + repr(plan)
    for entry in plan.keys:
        assert entry["d"] not in shown
    assert summary["active_kid"] == plan.new_kid
    assert [k["kid"] for k in summary["keys"]] == [e["kid"] for e in plan.keys]
    assert summary["keys"][0]["age_seconds"] == 0
    assert summary["keys"][1]["age_seconds"] >= 100  # the key the first rotation made


def test_concurrent_rotations_lose_no_key(key_dir: Path, algorithm: Algorithm):
    """Two processes rotating five times each at once leave all eleven keys in the file."""
    (initial,) = load_keyring(key_dir)
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from gateway.keyring import rotate
        start_at = float(sys.argv[1])
        while time.time() < start_at:
            time.sleep(0.001)
        made = []
        for _ in range(5):
            plan = rotate(Path(sys.argv[2]), algorithm={algorithm!r},
                          retire_after_seconds={RETIRE_AFTER}, dry_run=False)
            made.append(plan.new_kid)
        print(json.dumps(made))
        """
    )
    start_at = str(time.time() + 1.5)  # both are importing by then; they start together
    command = [sys.executable, "-c", script, start_at, str(key_dir)]
    workers = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    made: list[str] = []
    for worker in workers:
        out, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err.decode()
        made += json.loads(out)
    final = load_keyring(key_dir)
    assert len(made) == 10
    assert sorted(e["kid"] for e in final) == sorted([*made, initial["kid"]])
    assert final[0]["kid"] in made
    assert all("retired_at" in e for e in final[1:])


# --- The running gateway's view ------------------------------------------------------------------


async def test_tokens_of_old_and_new_key_verify_after_rotation_by_another_process(
    key_dir: Path, algorithm: Algorithm
):
    """A rotation written after the gateway loaded: old tokens still verify, new ones at once."""
    ring = ring_for(key_dir)
    source = KeyRingSource(ring)
    old_token = mint(ring.active)
    assert (await verify(source, old_token))["sub"] == "alice"
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    new_token = mint(plan.new_key)
    assert (await verify(source, new_token))["sub"] == "alice"
    assert (await verify(source, old_token))["sub"] == "alice"
    assert ring.active["kid"] == plan.new_kid
    assert ring.reloads == 1
    assert source.ready


async def test_unknown_kid_is_refused(key_dir: Path):
    """A kid that is in no version of the file gets no key."""
    source = KeyRingSource(ring_for(key_dir))
    assert await source.key("forged") is None


async def test_token_without_kid_uses_the_only_key(key_dir: Path, algorithm: Algorithm):
    """With one usable key a kid-less lookup finds it; with two it is ambiguous and refused."""
    ring = ring_for(key_dir)
    source = KeyRingSource(ring)
    assert await source.key(None) is not None
    rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    assert ring.reload_if_changed()
    assert await source.key(None) is None


async def test_forged_kid_flood_costs_one_look_at_the_file(key_dir: Path):
    """A thousand random kids trigger at most a couple of file checks and no reload."""
    ring = ring_for(key_dir)
    source = KeyRingSource(ring)
    for _ in range(1000):
        assert await source.key(secrets.token_urlsafe(16)) is None
    assert source.reload_checks <= 2
    assert ring.reloads == 0


async def test_unknown_kid_looks_again_after_the_cooldown(key_dir: Path, algorithm: Algorithm):
    """Within the cooldown a new kid is not looked for; once it passed, the file is read again."""
    now = [100.0]
    ring = ring_for(key_dir)
    source = KeyRingSource(ring, cooldown_seconds=1.0, clock=lambda: now[0])
    assert await source.key("forged") is None
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    now[0] += 0.5
    assert await source.key(plan.new_kid) is None
    assert source.reload_checks == 1
    now[0] += 0.6
    assert await source.key(plan.new_kid) is not None
    assert source.reload_checks == 2


def test_unchanged_file_is_not_reloaded(key_dir: Path):
    """reload_if_changed does nothing while the file is as it was."""
    ring = ring_for(key_dir)
    assert not ring.reload_if_changed()
    assert ring.reloads == 0


def test_garbled_file_on_reload_keeps_the_last_good_keys(key_dir: Path, algorithm: Algorithm):
    """A broken key file is logged and ignored; the ring signs and verifies with what it had."""
    ring = ring_for(key_dir)
    good = keyring_path(key_dir).read_bytes()
    active, published, revision = ring.active, ring.public_jwks(), ring.revision
    with capture_logs() as logs:
        write_private(keyring_path(key_dir), '{"keys": [{"kid": "half-writ')
        assert not ring.reload_if_changed()
        assert not ring.reload_if_changed()  # the same broken file is not parsed again
    assert ring.active == active
    assert ring.public_jwks() == published
    assert ring.revision == revision
    assert [e["event"] for e in logs] == ["keyring.reload_failed"]
    assert logs[0]["log_level"] == "warning"
    write_private(keyring_path(key_dir), good.decode())
    plan = rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    assert ring.reload_if_changed()
    assert ring.active["kid"] == plan.new_kid
    assert ring.revision != revision


def test_deleted_file_on_reload_keeps_the_last_good_keys(key_dir: Path):
    """A key file that vanished is logged; the ring keeps its keys."""
    ring = ring_for(key_dir)
    kid = ring.active["kid"]
    keyring_path(key_dir).unlink()
    with capture_logs() as logs:
        assert not ring.reload_if_changed()
    assert ring.active["kid"] == kid
    assert logs[0]["event"] == "keyring.reload_failed"


def test_public_jwks_never_holds_private_members(key_dir: Path, algorithm: Algorithm):
    """Every published key is public only, with kid, alg and use, however many rotations."""
    for _ in range(3):
        rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
    ring = ring_for(key_dir)
    document = ring.public_jwks()
    assert len(document["keys"]) == 4
    text = json.dumps(document)
    for value in private_values(key_dir):
        assert value not in text
    for entry in document["keys"]:
        assert not PRIVATE_MEMBERS & set(entry)
        assert entry["use"] == "sig"
        assert entry["alg"] == algorithm
        assert "created_at" not in entry
        assert "retired_at" not in entry


def test_ring_repr_and_logs_hold_no_private_material(key_dir: Path, algorithm: Algorithm):
    """The ring's repr and its reload log lines carry no private key member."""
    ring = ring_for(key_dir)
    with capture_logs() as logs:
        rotate(key_dir, algorithm=algorithm, retire_after_seconds=RETIRE_AFTER, dry_run=False)
        assert ring.reload_if_changed()
    shown = repr(ring) + json.dumps(logs, default=str)
    for value in private_values(key_dir):
        assert value not in shown
    assert logs[-1]["event"] == "keyring.reloaded"
