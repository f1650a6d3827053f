"""cr-proxy's own CA and the certificates it signs (cryptography).

The CA is made at first start under certs_dir (key mode 0600) or loaded
from `ca.crt` / `ca.key` there if the operator provides them. Leaves are EC
P-256: about 2 ms to make, and the cheapest handshake for clients that open
a new connection per request (docker, skopeo, podman).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "cr-proxy CA"
CA_DAYS = 3650
LEAF_DAYS = 397  # the longest validity Apple and the browsers accept
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def ensure_ca(certs_dir: Path) -> CertPair:
    """Load the CA, or make one on first start."""
    certs_dir.mkdir(parents=True, exist_ok=True)
    pair = CertPair(certs_dir / "ca.crt", certs_dir / "ca.key")
    if pair.cert.exists() and pair.key.exists():
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME} {socket.gethostname()}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(pair.key, key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def load_ca(pair: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def fingerprint(pair: CertPair) -> str:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def needs_renewal(cert_path: Path, names: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return True
    try:
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return True
    return not {_san(n) for n in names} <= have


def issue_leaf(ca: CertPair, names: list[str], out: CertPair) -> CertPair:
    """A leaf for these names, signed by the CA; reused until near expiry."""
    if out.key.exists() and not needs_renewal(out.cert, names):
        return out
    ca_cert, ca_key = load_ca(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(hours=1))
        .not_valid_after(_now() + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.cert.parent.mkdir(parents=True, exist_ok=True)
    _write_key(out.key, key)
    # The chain (leaf + CA) so clients that trust the CA can verify it.
    out.cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM) + ca.cert.read_bytes()
    )
    return out


def mirror_names(extra: tuple[str, ...]) -> list[str]:
    """What the mirror's certificate is valid for."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return list(dict.fromkeys(n.lower() for n in names if n))
