"""A regional parent cr-proxy. A site node sends each registry request of a
miss to the parent instead of the registry: to its mirror port
(`parent_mirror`), the registry as the path's first component as a client
names it (layout.mirror_prefix), or through
its https_proxy (`upstream_proxy`), as https://<registry> over CONNECT, the
parent's certificate checked against `upstream_proxy_ca` and the system's
CAs. The parent logs in upstream with its own credentials, fills its cache
once for all its sites and answers from that cache while its own upstream
is down; the site still verifies every digest it stores. When the parent
cannot be reached, `parent_fallback` says whether the site goes to the
registry itself (direct) or fails at once (fail)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from cr_proxy.cache.layout import mirror_prefix
from cr_proxy.config import Config
from cr_proxy.errors import ConfigError, UpstreamError, UpstreamTimeout, UpstreamUnreachable

# Headers a site never sends its parent: its credentials are its own (the
# parent uses its own).
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


class Parent:
    __slots__ = ("direct_fallback", "mirror", "proxy", "ssl", "url")

    def __init__(self, url: str, direct_fallback: bool, *, proxy: bool = False,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.direct_fallback = direct_fallback
        self.proxy = proxy  # url is an https_proxy, not a mirror
        self.ssl = ssl_context

    def __repr__(self) -> str:
        kind = "proxy" if self.proxy else "mirror"
        return f"<Parent {kind} {self.url} fallback={'direct' if self.direct_fallback else 'fail'}>"

    @classmethod
    def of(cls, config: Config) -> Parent | None:
        direct = config.parent_fallback == "direct"
        if config.parent_mirror:
            return cls(config.parent_mirror, direct)
        if not config.upstream_proxy:
            return None
        context = ssl.create_default_context()
        if config.upstream_proxy_ca is not None:
            try:
                context.load_verify_locations(cafile=config.upstream_proxy_ca)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(message=f"upstream_proxy_ca: cannot load "
                                  f"{config.upstream_proxy_ca}: {err}") from err
        return cls(config.upstream_proxy, direct, proxy=True, ssl_context=context)

    def request_url(self, registry: str, path: str) -> str:
        """Where a registry path (which may carry a query) is asked for: the
        parent's mirror with the registry as the path's first component
        (layout.mirror_prefix), as a peer asks its owner; ?ns= only for a
        path that names no repository."""
        if self.proxy:
            return f"https://{registry}{path}"
        rest = path.removeprefix("/v2/")
        if rest and not rest.startswith("?") and rest != path:
            return f"{self.url}/v2/{mirror_prefix(registry)}/{rest}"
        joiner = "&" if "?" in path else "?"
        return f"{self.url}{path}{joiner}ns={quote(registry, safe='.:-')}"

    async def send(
        self, session: aiohttp.ClientSession, method: str, registry: str, path: str,
        headers: Mapping[str, str],
    ) -> aiohttp.ClientResponse | None:
        """The parent's answer; None when it cannot be reached and the
        fallback is direct (the caller then asks the registry). Raises
        UpstreamUnreachable when it cannot be reached and the fallback is
        fail, UpstreamTimeout when it was reached but went silent."""
        sent = {k: v for k, v in headers.items() if k.lower() not in PRIVATE_HEADERS}
        extra: dict[str, Any] = {"proxy": self.url, "ssl": self.ssl} if self.proxy else {}
        try:
            return await session.request(method, self.request_url(registry, path),
                                         headers=sent, allow_redirects=False, **extra)
        except aiohttp.ClientSSLError as err:
            # Reached, but not trusted: a wrong upstream_proxy_ca, not an outage.
            raise UpstreamError(message=f"{registry}: the parent {self.url}'s TLS: {err}") from err
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as err:
            if self.direct_fallback:
                return None
            raise UpstreamUnreachable(
                message=f"{registry}: the parent {self.url} is unreachable "
                        f"(parent_fallback: fail): {err}") from err
        except (aiohttp.ServerTimeoutError, TimeoutError) as err:
            raise UpstreamTimeout(message=f"{registry}: the parent {self.url} "
                                  "did not answer in time") from err
        except (aiohttp.ClientHttpProxyError, aiohttp.ClientOSError,
                aiohttp.ServerDisconnectedError) as err:
            raise UpstreamError(message=f"{registry}: the parent {self.url}: {err}") from err
