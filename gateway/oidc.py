"""OIDC discovery of an external issuer's JWKS, and the mapping of its claims onto gateway roles.

Never trusts a discovery document that names another issuer, and never lets an external value
the role map does not name become a role.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

WELL_KNOWN_PATH = "/.well-known/openid-configuration"
# A discovery document is a few KB; a bigger body is a misconfiguration or an attack on memory.
MAX_DOCUMENT_BYTES = 1_000_000
_LOOPBACK_NAMES = {"localhost"}


class DiscoveryError(Exception):
    """The issuer's discovery document cannot be used; the message names the URL and the fault."""


@dataclass(frozen=True)
class OidcMetadata:
    """What discovery found: the verified issuer, its JWKS URI, and the whole document."""

    issuer: str
    jwks_uri: str
    document: Mapping[str, Any] = field(repr=False, compare=False)


def is_safe_url(url: str) -> bool:
    """Whether url is https, or plain http to a loopback host (tests and sidecar IdPs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        return False
    if parts.scheme == "https":
        return bool(host)
    return parts.scheme == "http" and _is_loopback(host)


def _is_loopback(host: str | None) -> bool:
    # Compare the parsed host, not a prefix: "http://localhost.attacker.example" and
    # "http://127.0.0.1@attacker.example" start like loopback URLs and are not.
    if not host:
        return False
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def discover(
    session: aiohttp.ClientSession, issuer: str, *, timeout_seconds: float
) -> OidcMetadata:
    """Fetch and check {issuer}/.well-known/openid-configuration (OIDC Discovery 1.0).

    Raises DiscoveryError when the document is unreachable, too large, not a JSON object,
    names another issuer, or has no usable jwks_uri.
    """
    if not is_safe_url(issuer):
        raise DiscoveryError(f"issuer {issuer!r} must be https (or loopback http)")
    url = issuer.rstrip("/") + WELL_KNOWN_PATH
    body = await _fetch(session, url, timeout_seconds)
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DiscoveryError(f"{url}: the body is not JSON") from None
    if not isinstance(document, dict):
        raise DiscoveryError(f"{url}: the document is not a JSON object")
    # OIDC Discovery 1.0 section 4.3: the issuer must be exactly the one asked about, or a
    # document served elsewhere could hand us someone else's keys.
    if document.get("issuer") != issuer:
        raise DiscoveryError(
            f"{url}: the document names issuer {document.get('issuer')!r}, not {issuer!r}"
        )
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri:
        raise DiscoveryError(f"{url}: the document has no jwks_uri")
    if not is_safe_url(jwks_uri):
        raise DiscoveryError(f"{url}: jwks_uri {jwks_uri!r} must be https (or loopback http)")
    return OidcMetadata(issuer=issuer, jwks_uri=jwks_uri, document=document)


async def _fetch(session: aiohttp.ClientSession, url: str, timeout_seconds: float) -> bytes:
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    try:
        # No redirects: one to plain http would let a network attacker write the document.
        async with session.get(url, timeout=timeout, allow_redirects=False) as response:
            if response.status != 200:  # noqa: PLR2004 - HTTP OK, nothing else is a document
                raise DiscoveryError(f"{url}: HTTP {response.status}, expected 200")
            if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                raise DiscoveryError(f"{url}: the document is over {MAX_DOCUMENT_BYTES} bytes")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65_536):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise DiscoveryError(f"{url}: the document is over {MAX_DOCUMENT_BYTES} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DiscoveryError(f"{url}: unreachable ({type(exc).__name__})") from None
    return bytes(body)


def map_roles(claims: Mapping[str, Any], roles_claim: str, role_map: Sequence[str]) -> list[str]:
    """The gateway roles for the value at the dotted path roles_claim of claims.

    The value may be a list of strings, or one string of space-separated values (as OAuth's
    `scope`); absent means no roles. With an empty role_map the values are the roles. Otherwise
    each "external=role" entry grants role for that external value, and values no entry names
    are dropped. Duplicates are removed, first appearance first. Raises ValueError for any
    other shape, so a malformed claim is refused rather than read as "no roles".
    """
    values = _claim_values(claim_path(claims, roles_claim), roles_claim)
    if not role_map:
        return _unique(values)
    granted = _parse_role_map(role_map)
    roles: list[str] = []
    for value in values:
        roles.extend(granted.get(value, ()))
    return _unique(roles)


def claim_path(claims: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of the claims ("realm_access.roles"); None when absent."""
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _claim_values(value: Any, roles_claim: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValueError(f"claim {roles_claim!r} is neither a string nor a list of strings")


def _parse_role_map(role_map: Sequence[str]) -> dict[str, list[str]]:
    granted: dict[str, list[str]] = {}
    for entry in role_map:
        # Split at the last '=': external values such as LDAP DNs ("cn=admins,ou=groups")
        # contain '=' themselves, gateway roles never do.
        external, sep, role = entry.rpartition("=")
        if not sep or not external.strip() or not role.strip():
            raise ValueError(f"role_map entry {entry!r} is not external=role")
        granted.setdefault(external.strip(), []).append(role.strip())
    return granted


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))
