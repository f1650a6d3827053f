"""cr-proxy's own CA and the certificates it signs (cryptography).

The CA is made at first start under certs_dir (key mode 0600; leaf keys
and certificates 0640, for nginx's workers' group) or loaded
from `ca.crt` / `ca.key` there if the operator provides them. Leaves are EC
P-256: about 2 ms to make, and the cheapest handshake for clients that open
a new connection per request (docker, skopeo, podman).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cr_proxy.net.address import ip_literal

CA_NAME = "cr-proxy CA"
CA_DAYS = 3650
LEAF_DAYS = 397  # the longest validity Apple and the browsers accept
RENEW_BEFORE = datetime.timedelta(days=30)
# Not for other local users. nginx's workers read leaves (keys included)
# when a handshake picks one by SNI, through certs_dir's group (2750:
# privsep.py); the CA key stays 0600, theirs to never read.
LEAF_KEY_MODE = 0o640
CERT_MODE = 0o640


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write then rename: nginx reads leaves at each handshake and must never
    see half a file. Flushed before the rename: after a power loss a new
    name could otherwise hold an empty file, and an empty CA or host leaf
    stops every later start (load_ca, nginx -t)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, mode: int = 0o600) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, data, mode)


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
    _write_atomic(pair.cert, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    return pair


def load_ca(pair: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    return cert, key  # type: ignore[return-value]


def fingerprint(pair: CertPair) -> str:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _san(name: str) -> x509.GeneralName:
    address = ip_literal(name.strip("[]"))
    return x509.DNSName(name) if address is None else x509.IPAddress(address)


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
    _write_key(out.key, key, LEAF_KEY_MODE)
    # The chain (leaf + CA) so clients that trust the CA can verify it.
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert.read_bytes()
    _write_atomic(out.cert, chain, CERT_MODE)
    return out


def mirror_names(extra: tuple[str, ...]) -> list[str]:
    """What the mirror's certificate is valid for."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]
    return list(dict.fromkeys(n.lower() for n in names if n))


def ensure_mirror_leaf(ca: CertPair, certs_dir: Path, extra_names: tuple[str, ...]) -> CertPair:
    """The mirror ports' certificate, certs_dir/mirror.crt and .key: valid
    for mirror_names(extra_names), signed by `ca`, reused until it nears
    expiry or stops covering them."""
    return issue_leaf(ca, mirror_names(extra_names),
                      CertPair(certs_dir / "mirror.crt", certs_dir / "mirror.key"))


FALLBACK_NAME = "_fallback"  # served to an SNI that is not a plain host name
DEFAULT_MAX_HOSTS = 256  # proxy.max_hosts


class LeafCache:
    """Leaf certificates for intercepted hosts under certs_dir/hosts/, made on
    first sight of a host, reused, renewed before they expire. nginx picks
    the file by SNI at each handshake, so a new registry needs no restart.

    At most `max_hosts` of them (proxy.max_hosts): past it the least
    recently used is dropped, at start-up too (by the leaves' mtimes, which
    the hourly check of a leaf in use touches). A dropped leaf's files go at
    once, or, when on_drop is set, when its owner (serve's HostServers, once
    nginx has reloaded without the host's server) calls remove()."""

    __slots__ = ("_checked", "_hosts", "_issuing", "_pending", "ca", "dir", "max_hosts",
                 "on_drop")

    RECHECK = 3600.0  # seconds between expiry checks of a leaf in use

    def __init__(self, ca: CertPair, certs_dir: Path, max_hosts: int = DEFAULT_MAX_HOSTS) -> None:
        self.ca = ca
        self.dir = certs_dir / "hosts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_hosts = max_hosts
        # host -> (when its leaf was last checked, its pair): the check runs
        # once an hour, not at each of a host's many connections.
        self._checked: dict[str, tuple[float, CertPair]] = {}
        self._pending: dict[str, asyncio.Future[CertPair]] = {}
        # Hosts whose leaf someone awaits: remove() leaves their files alone.
        self._issuing: Counter[str] = Counter()
        # Hosts with a leaf on disk, least recently used first.
        self._hosts: OrderedDict[str, None] = OrderedDict.fromkeys(self._on_disk())
        self.on_drop: Callable[[str], None] | None = None
        self._bound()

    def __repr__(self) -> str:
        return f"<LeafCache {self.dir} {len(self._hosts)}/{self.max_hosts} hosts>"

    def _on_disk(self) -> list[str]:
        """Hosts with a leaf here, oldest use first."""
        leaves = []
        for path in self.dir.glob("*.crt"):
            if path.stem != FALLBACK_NAME:
                with contextlib.suppress(FileNotFoundError):
                    leaves.append((path.stat().st_mtime, path.stem))
        return [host for _, host in sorted(leaves)]

    def pair(self, host: str) -> CertPair:
        return CertPair(self.dir / f"{host}.crt", self.dir / f"{host}.key")

    def has(self, host: str) -> bool:
        return host in self._hosts

    def ensure_sync(self, host: str) -> CertPair:
        pair = issue_leaf(self.ca, [host], self.pair(host))
        # The mtime orders leaves by use when serve starts again.
        os.utime(pair.cert)
        return pair

    async def ensure(self, host: str) -> CertPair:
        """The host's leaf, issued if missing or near expiry (coalesced)."""
        if host in self._hosts:
            self._hosts.move_to_end(host)
        checked = self._checked.get(host)
        if checked and time.monotonic() - checked[0] < self.RECHECK:
            return checked[1]
        future = self._pending.get(host)
        if future is None:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(loop.run_in_executor(None, self.ensure_sync, host))
            self._pending[host] = future
            future.add_done_callback(lambda _: self._pending.pop(host, None))
        self._issuing[host] += 1
        try:
            pair = await asyncio.shield(future)
        finally:
            self._issuing -= Counter({host: 1})
        self._checked[host] = (time.monotonic(), pair)
        if host not in self._hosts:
            self._hosts[host] = None
            self._bound()
        return pair

    def _bound(self) -> None:
        while len(self._hosts) > self.max_hosts:
            host, _ = self._hosts.popitem(last=False)
            self._checked.pop(host, None)
            if self.on_drop:
                self.on_drop(host)
            else:
                self.remove(host)

    def remove(self, host: str) -> None:
        """Delete a dropped host's leaf, unless it came back meanwhile."""
        if host in self._hosts or host in self._issuing:
            return
        pair = self.pair(host)
        pair.cert.unlink(missing_ok=True)
        pair.key.unlink(missing_ok=True)

    def ensure_fallback(self) -> CertPair:
        return issue_leaf(self.ca, ["cr-proxy.invalid"], self.pair(FALLBACK_NAME))
