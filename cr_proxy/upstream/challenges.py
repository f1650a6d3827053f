"""What each upstream host's `GET /v2/` answered, kept so a client can
still be told how (or that it need not) log in while the upstream cannot
be reached: containers/image clients (skopeo, podman, buildah) ping /v2/
first in https_proxy mode and give up on anything but 200 or 401.

Policy: one record per host, the /v2/ one, in the tree
(`www-authenticate/<domain>/v2/_index`) and in memory. The header tree
holds the WWW-Authenticate header the answer carried: a 401's challenge
(without its scope; any path's 401 stands in for /v2/'s, unless this
process saw /v2/ answer 200), or nothing at all (an empty value) for a
200, the anonymous ping. A missing file is "never seen". Only that one
file: a 401 for a name that does not exist must not create files in the
cache. The challenge of a path we store is written with what it protects,
by the commit (for_repository gives its value). The value is checked both
ways: only a challenge that parses is stored, and only an empty value or a
challenge that parses is replayed (a hand-edited file is not).
The upstream client records the 401s it sees (Upstream.registry); the
fetcher's pass-through records the /v2/ answers it relays and replays the
stored one when the host is down. The challenge's realm also says which
path under /v2/ of the host itself is its token endpoint (gcr.io and
Artifact Registry: /v2/token; quay.io: /v2/auth): `own_realm_path`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from cr_proxy.cache.layout import Sidecar
from cr_proxy.cache.store import Store
from cr_proxy.errors import CrProxyError
from cr_proxy.net.address import SCHEME_PORTS
from cr_proxy.upstream.auth import parse_challenge, scoped, without_scope

log = logging.getLogger("cr_proxy.upstream")

SIDECAR = Sidecar.WWW_AUTHENTICATE
PING_PATH = "/v2/"
ANONYMOUS = ""  # the stored value of a 200: the answer carried no challenge


@dataclass(frozen=True, slots=True)
class PingAnswer:
    """A host's /v2/ answer as stored: 200, or 401 with its challenge."""

    challenge: str | None  # None: 200, anonymous

    @property
    def status(self) -> int:
        return 200 if self.challenge is None else 401


class Challenges:
    """The /v2/ answer of each host, as stored. Without a store (a bare
    Upstream, in tests) nothing is kept."""

    __slots__ = ("_plain", "_store")

    def __init__(self, store: Store | None = None) -> None:
        self._store = store
        # domain -> its /v2/ record as stored: a challenge, or ANONYMOUS
        self._plain: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<Challenges {sorted(self._plain)}>"

    def seen(self, host: str, header: str) -> None:
        """Keep a 401's challenge (of any path), without its scope, as the
        host's /v2/ one, unless /v2/ itself was seen answering 200: a
        registry open at /v2/ may still guard some repositories, and the
        record is what /v2/ says (nor should the two answers take turns
        rewriting it)."""
        if self._plain.get(host) != ANONYMOUS:
            self._keep_challenge(host, header)

    def answered(self, host: str, status: int, header: str | None) -> None:
        """Keep what the host's /v2/ answered: a 200, or a 401 with its
        challenge. Other answers (5xx, 404) say nothing worth replaying."""
        if status == 200:
            self._keep(host, ANONYMOUS)
        elif status == 401 and header:
            self._keep_challenge(host, header)

    def _keep_challenge(self, host: str, header: str) -> None:
        """One that does not parse as a challenge is not kept, nor one with
        bytes other than printable ASCII (aiohttp hands raw bytes over as
        surrogates, which no file or header can take)."""
        if not (header.isascii() and header.isprintable()) or parse_challenge(header) is None:
            log.debug("not storing challenge for %s: not a challenge: %r", host, header[:80])
            return
        self._keep(host, without_scope(header))

    def _keep(self, host: str, value: str) -> None:
        """Written inline: one small file, only when it changed."""
        if self._store is None or self._plain.get(host) == value:
            return
        try:
            self._store.write_sidecar(SIDECAR, host, PING_PATH, value)
            self._plain[host] = value
        except (CrProxyError, OSError) as err:
            log.debug("not storing the /v2/ answer of %s: %s", host, err)

    def for_repository(self, domain: str, name: str) -> str | None:
        """The challenge a client would get for a path of repository `name`
        (written by the commit beside what it protects), or None."""
        plain = self._plain.get(domain)
        return scoped(plain, name) if plain else None

    def known(self, host: str) -> PingAnswer | None:
        """The host's /v2/ answer as this process kept it, or None when it
        kept none yet (since its start: stored() reads the tree)."""
        value = self._plain.get(host)
        if value is None:
            return None
        return PingAnswer(None if value == ANONYMOUS else value)

    def stored(self, host: str) -> PingAnswer | None:
        """The /v2/ answer to replay for a host that is down, or None when
        none was kept or the record is not one we wrote (blocks: run it in
        an executor)."""
        if self._store is None:
            return None
        # whole: a record a power loss left empty is not the "" of "no login".
        value = self._store.read_sidecar(SIDECAR, host, PING_PATH, whole=True)
        if value is None:
            return None
        if value == ANONYMOUS:
            return PingAnswer(None)
        if not (value.isascii() and value.isprintable()) or parse_challenge(value) is None:
            log.warning("not replaying the /v2/ answer of %s: stored value is not a challenge",
                        host)
            return None
        return PingAnswer(value)


def own_realm_path(challenge: str, scheme: str, host: str, port: int) -> str | None:
    """The path of a Bearer challenge's token realm when the realm is on
    scheme://host:port itself, else None: a realm on another host, port or
    scheme names no path of this one."""
    parsed = parse_challenge(challenge)
    if parsed is None or parsed.scheme != "bearer" or not parsed.realm:
        return None
    try:
        parts = urlsplit(parsed.realm)
        realm_port = parts.port or SCHEME_PORTS.get(parts.scheme)
    except ValueError:  # "https://[::1/x", "https://h:99999/x": the registry's words
        return None
    if (parts.scheme, parts.hostname, realm_port) != (scheme, host, port):
        return None
    return parts.path
