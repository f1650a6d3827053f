"""A regional parent cr-proxy (`parent_mirror`): a site node sends each
registry request of a miss to the parent's mirror port instead of the
registry, naming the registry in ?ns= as containerd does. The parent logs in
upstream with its own credentials, fills its cache once for all its sites
and answers from that cache while its own upstream is down; the site still
verifies every digest it stores. When the parent cannot be reached,
`parent_fallback` says whether the site goes to the registry itself
(direct) or fails at once (fail)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

import aiohttp

from cr_proxy.config import Config
from cr_proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable

# Headers a site never sends its parent: its credentials are its own (the
# parent's mirror takes no login; it uses the parent's).
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


class Parent:
    __slots__ = ("direct_fallback", "url")

    def __init__(self, url: str, direct_fallback: bool) -> None:
        self.url = url
        self.direct_fallback = direct_fallback

    def __repr__(self) -> str:
        return f"<Parent {self.url} fallback={'direct' if self.direct_fallback else 'fail'}>"

    @classmethod
    def of(cls, config: Config) -> Parent | None:
        if not config.parent_mirror:
            return None
        return cls(config.parent_mirror, config.parent_fallback == "direct")

    def request_url(self, registry: str, path: str) -> str:
        """The parent's URL for a registry path (which may carry a query)."""
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
        try:
            return await session.request(method, self.request_url(registry, path),
                                         headers=sent, allow_redirects=False)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as err:
            if self.direct_fallback:
                return None
            raise UpstreamUnreachable(
                message=f"{registry}: the parent {self.url} is unreachable "
                        f"(parent_fallback: fail): {err}") from err
        except (aiohttp.ServerTimeoutError, TimeoutError) as err:
            raise UpstreamTimeout(message=f"{registry}: the parent {self.url} "
                                  "did not answer in time") from err
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as err:
            raise UpstreamError(message=f"{registry}: the parent {self.url}: {err}") from err
