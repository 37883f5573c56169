"""Dev certificates (a local CA and a server certificate) and the server's SSL context.

Private keys are written 0600. The dev CA is for development only; production brings its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from empsecrets.files import write_private

if TYPE_CHECKING:
    from pathlib import Path

    from gateway.config import TlsConfig

DEV_NAMES = ("localhost",)
DEV_ADDRESSES = ("127.0.0.1", "::1")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EMP gateway (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_dev_ca(days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may only sign end-entity certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("EMP gateway dev CA"))
        .issuer_name(_name("EMP gateway dev CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    names: tuple[str, ...] = DEV_NAMES,
    addresses: tuple[str, ...] = DEV_ADDRESSES,
    days: int = 397,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate for the given DNS names and IP addresses, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_dev_certs(config: TlsConfig, *, force: bool = False) -> list[Path]:
    """Create the dev CA and server certificate unless they exist; the paths written."""
    written: list[Path] = []
    if force or not (config.ca_file.exists() and config.ca_key_file.exists()):
        ca_key, ca_cert = make_dev_ca()
        write_private(config.ca_key_file, _key_pem(ca_key))
        config.ca_file.write_text(_cert_pem(ca_cert), encoding="utf-8")
        written += [config.ca_file, config.ca_key_file]
        force = True  # a new CA invalidates the old server certificate
    if force or not (config.cert_file.exists() and config.key_file.exists()):
        ca_key_loaded = serialization.load_pem_private_key(config.ca_key_file.read_bytes(), None)
        if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey):
            raise TypeError(f"{config.ca_key_file}: expected an EC private key")
        ca_cert = x509.load_pem_x509_certificate(config.ca_file.read_bytes())
        key, cert = make_server_cert(ca_key_loaded, ca_cert)
        write_private(config.key_file, _key_pem(key))
        config.cert_file.write_text(_cert_pem(cert), encoding="utf-8")
        written += [config.cert_file, config.key_file]
    return written


# TLS 1.2 suites: forward secrecy and AEAD only (Mozilla's "intermediate" profile, less DHE);
# TLS 1.3 suites are all AEAD and are not affected by set_ciphers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2+ server context, AEAD suites only; a missing certificate is a refusal to start."""
    for path in (config.cert_file, config.key_file):
        if not path.exists():
            raise FileNotFoundError(f"{path}: TLS file missing; run `gateway certs dev`")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(config.cert_file, config.key_file)
    return context


class PlaintextRefused(RuntimeError):  # noqa: N818 - reads as the condition
    """Production without TLS and without --allow-plaintext."""


def listen_plain(config: TlsConfig, *, production: bool, allow_plaintext: bool) -> bool:
    """Whether the API listens without TLS; PlaintextRefused when that is not allowed."""
    if config.enabled:
        return False
    if production and not allow_plaintext:
        raise PlaintextRefused(
            "tls.enabled is false in production: the API would listen in plain HTTP. Terminate "
            "TLS here (tls.enabled = true), or, behind a proxy that does, start with "
            "`gateway serve --allow-plaintext`"
        )
    return True


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context, trusting ca_file in addition to the system store."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
