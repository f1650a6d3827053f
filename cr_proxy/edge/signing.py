"""Signed module URLs (`artifacts.signed_urls`, seed 003's unguessable
URLs): `/artifacts/s/<token>`.

Policy:

- The key is 32 random bytes (`secrets`), hex in certs_dir/url-signing.key,
  made at first start (serve's, or the first `artifact-url`), 0600 like the
  CA key (privsep.SECRETS keeps it so), never logged.
- A token is `<payload>.<mac>`, both base64url: the payload is the expiry
  (Unix seconds), the module layer's digest, whether it is Wasm, and the
  reference it was resolved from; the mac is HMAC-SHA256 over the payload
  bytes (Python's hmac, compared in constant time).
- A token names its digest: it serves those bytes and no others, so a URL
  cannot be turned into another digest's, and a signed tag URL does not
  follow the tag (the module it was signed for is served until it
  expires; Envoy's sha256 would refuse other bytes anyway).
- A wrong, expired, malformed or tampered token is refused the same way,
  403 DENIED, without saying which.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cr_proxy.config import Config
from cr_proxy.errors import ConfigError, CrProxyError
from cr_proxy.oci.reference import is_digest

KEY_FILE = "url-signing.key"
KEY_BYTES = 32
MAX_TOKEN = 2048  # characters; a real one is a few hundred


class Forbidden(CrProxyError):
    status = 403
    code = "DENIED"


REFUSED = "this signed URL is not valid (wrong, expired or tampered)"


def key_path(config: Config) -> Path:
    return config.certs_dir / KEY_FILE


def ensure_key(path: Path) -> bytes:
    """The signing key, made if there is none (first start)."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole (0600 before a byte is in it) under a name of its own,
    # then linked into place: a second process starting at the same moment
    # either links first or reads a whole key, never an empty file, and a
    # crash leaves no key file at all.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(KEY_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # the other process's key stands
            os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    text = path.read_text().strip()
    if len(text) < KEY_BYTES:
        raise ConfigError(message=f"{path}: the URL-signing key is too short (remove it: a "
                          "new one is made at start, and URLs signed before stop working)")
    return text.encode()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token allows: one digest of one repository, until `expires`."""

    reference: str  # the reference it was resolved from, in Docker's canonical form
    digest: str  # the module layer's
    wasm: bool
    expires: int  # Unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, grant: Grant) -> str:
    payload = json.dumps([grant.expires, grant.digest, int(grant.wasm), grant.reference],
                         separators=(",", ":")).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify(key: bytes, token: str, now: float | None = None) -> Grant:
    """The grant of a genuine, unexpired token; Forbidden otherwise."""
    if len(token) > MAX_TOKEN or token.count(".") != 1:
        raise Forbidden(message=REFUSED)
    payload_text, mac_text = token.split(".")
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (binascii.Error, ValueError) as err:
        raise Forbidden(message=REFUSED) from err
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise Forbidden(message=REFUSED)
    # Genuine from here on: only our own signer made this payload.
    expires, digest, wasm, reference = json.loads(payload)
    if not is_digest(digest) or (time.time() if now is None else now) >= expires:
        raise Forbidden(message=REFUSED)
    return Grant(reference, digest, bool(wasm), int(expires))
