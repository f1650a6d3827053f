"""The upstream's 401 challenges, kept so a client can be told how to log
in while the upstream cannot be reached.

Policy: one challenge per host is kept, the /v2/ one (any 401's, without
its scope), in the tree (`www-authenticate/<domain>/v2/_index`) and in
memory. Only that one file: a 401 for a name that does not exist must not
create files in the cache. The challenge of a path we store is written
with what it protects, by the commit (for_repository gives its value).
The upstream client records what it sees (Upstream.registry); the fetcher's
pass-through records the 401s it relays and replays the stored challenge
when the host is down.
"""

from __future__ import annotations

import logging

from cr_proxy.cache.layout import Sidecar
from cr_proxy.cache.store import Store
from cr_proxy.errors import CrProxyError
from cr_proxy.upstream.auth import scoped, without_scope

log = logging.getLogger("cr_proxy.upstream")

SIDECAR = Sidecar.WWW_AUTHENTICATE
PING_PATH = "/v2/"


class Challenges:
    """The /v2/ challenge of each host, as stored. Without a store (a bare
    Upstream, in tests) nothing is kept."""

    __slots__ = ("_plain", "_store")

    def __init__(self, store: Store | None = None) -> None:
        self._store = store
        self._plain: dict[str, str] = {}  # domain -> its /v2/ challenge, as stored

    def __repr__(self) -> str:
        return f"<Challenges {sorted(self._plain)}>"

    def seen(self, host: str, header: str) -> None:
        """Keep a 401's challenge, without its scope, as the host's /v2/
        one. Written inline: one small file, only when it changed."""
        plain = without_scope(header)
        if self._store is None or self._plain.get(host) == plain:
            return
        try:
            self._store.write_sidecar(SIDECAR, host, PING_PATH, plain)
            self._plain[host] = plain
        except (CrProxyError, OSError) as err:
            log.debug("not storing challenge for %s: %s", host, err)

    def for_repository(self, domain: str, name: str) -> str | None:
        """The challenge a client would get for a path of repository `name`
        (written by the commit beside what it protects), or None."""
        plain = self._plain.get(domain)
        return scoped(plain, name) if plain else None

    def stored(self, host: str) -> str | None:
        """The /v2/ challenge to replay for a host that is down (blocks:
        run it in an executor)."""
        if self._store is None:
            return None
        return self._store.read_sidecar(SIDECAR, host, PING_PATH)
