"""One exception tree for cr-proxy; each leaf carries the HTTP status a client
should see and the OCI error code (distribution spec, "Error Codes")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager


class CrProxyError(Exception):
    status = 500
    code = "UNKNOWN"

    def __init__(self, code: str | None = None, message: str = "") -> None:
        super().__init__(message or code or self.code)
        if code:
            self.code = code
        self.message = message or self.code

    def body(self) -> bytes:
        """The registry-style JSON error body."""
        return json.dumps({"errors": [{"code": self.code, "message": self.message}]}).encode()


class ConfigError(CrProxyError, ValueError):
    """A bad setting; the message names the key."""

    code = "CONFIG"


class BadRequest(CrProxyError, ValueError):
    status = 400
    code = "NAME_INVALID"


class NotFound(CrProxyError, LookupError):
    status = 404
    code = "MANIFEST_UNKNOWN"


class Unsupported(CrProxyError):
    status = 405
    code = "UNSUPPORTED"


class Unauthorized(CrProxyError):
    """A private repository asked for without a credential the upstream
    accepts (fetch/private.py): 401 with the upstream's challenge, so the
    client gets a token and asks again, as it would of the upstream."""

    status = 401
    code = "UNAUTHORIZED"

    def __init__(self, message: str, challenge: str | None) -> None:
        super().__init__(message=message)
        self.challenge = challenge


class Denied(CrProxyError, PermissionError):
    """Refused whatever the credential (a private repository offline under
    private.offline)."""

    status = 403
    code = "DENIED"


class UpstreamError(CrProxyError):
    """The upstream answered, but not with what we need."""

    status = 502
    code = "UPSTREAM_ERROR"


class TokenRefused(UpstreamError):
    """A token server answered 401 or 403: the credential (or none) is refused."""


class UpstreamUnreachable(UpstreamError, ConnectionError):
    """Connect failed, timed out, or the host is remembered as down."""

    status = 503
    code = "UPSTREAM_UNREACHABLE"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "UPSTREAM_TIMEOUT"


class DestinationRefused(CrProxyError, PermissionError):
    """The policy forbids connecting there (loopback, private, link-local)."""

    status = 403
    code = "DENIED"


class ProxyRefused(DestinationRefused):
    """The CONNECT front refuses a client or a destination."""


class ProtocolError(BadRequest):
    """A proxy request head that is not HTTP/1.x as we accept it."""

    code = "BAD_REQUEST"


class DigestMismatch(UpstreamError):
    code = "DIGEST_INVALID"


class ManifestInvalid(UpstreamError):
    """An upstream answer that is not a manifest we store or serve: not a
    schema 2 manifest or index, too large, or a header value we will not replay."""

    code = "MANIFEST_INVALID"


class Truncated(UpstreamError):
    code = "BLOB_UPLOAD_INVALID"


class TooLarge(UpstreamError):
    """An upstream body over what we accept (limits.max_blob_size)."""

    code = "SIZE_INVALID"


class NotCached(NotFound, UpstreamError):
    """Not in the cache, and the upstream cannot be reached: a 404 with the
    reason, as distribution's proxy answers. A 5xx's body reaches nobody
    (dockerd and containers/image print only the status), a 404's message
    every client prints. Still an upstream error (counted as one)."""


@contextmanager
def offline_miss(code: str, what: str, host: str) -> Iterator[None]:
    """Within: an unreachable upstream means `what` (a manifest or blob
    reference) cannot be had at all; the client is told so by name."""
    try:
        yield
    except UpstreamUnreachable as err:
        raise NotCached(code, f"{what} is not in the cache, and {host} is unreachable") from err
