"""The dev issuer's signing keys and the upstream shared secret, generated into var/.

Private material is written 0600 and never logged; only public keys leave this module.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

import jwt
from jwcrypto import jwk

if TYPE_CHECKING:
    from pathlib import Path

SIGNING_KEYS_FILE = "signing.jwks.json"
DEV_ALGORITHM = "EdDSA"


def write_private(path: Path, text: str) -> None:
    """Create or replace a file readable by the owner only (0600 from creation, not after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    tmp.replace(path)


def ensure_signing_key(key_dir: Path, *, force: bool = False) -> bool:
    """Generate the dev issuer's Ed25519 signing key unless one exists; True if generated."""
    path = key_dir / SIGNING_KEYS_FILE
    if path.exists() and not force:
        return False
    key = jwk.JWK.generate(kty="OKP", crv="Ed25519")
    exported: dict[str, Any] = key.export(private_key=True, as_dict=True)
    exported.update(kid=key.thumbprint(), alg=DEV_ALGORITHM, use="sig", created_at=int(time.time()))
    write_private(path, json.dumps({"keys": [exported]}, indent=2) + "\n")
    return True


def load_private_keys(key_dir: Path) -> list[dict[str, Any]]:
    """The dev issuer's private JWKs, newest first; a missing file is a refusal to start."""
    path = key_dir / SIGNING_KEYS_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no signing key; run `gateway keys init`") from None
    keys: list[dict[str, Any]] = document["keys"]
    if not keys:
        raise ValueError(f"{path}: the key set is empty; run `gateway keys init --force`")
    return keys


def public_jwks(private_keys: list[dict[str, Any]]) -> dict[str, Any]:
    """The JWKS document to publish: public parts only."""
    published = []
    for entry in private_keys:
        public = jwk.JWK(**{k: v for k, v in entry.items() if k != "created_at"}).export_public(
            as_dict=True
        )
        public.update(kid=entry["kid"], alg=entry["alg"], use="sig")
        published.append(public)
    return {"keys": published}


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
    signing = jwt.PyJWK({k: v for k, v in private_key.items() if k != "created_at"})
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
