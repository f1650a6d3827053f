"""`cr-proxy artifact-url REF`: the URL a client without registry
credentials (Envoy's remote Wasm source, a device) fetches a module from,
and the sha256 it checks it against.

The module is resolved by a fetcher (serve's, or one in this process:
fetcher_client.py) with a GET of its `/artifacts/` route, whose answer
is nginx's redirect (no body) or a registry error, so the blob is cached
on the way, through the same path a client's GET takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, urlencode

from cr_proxy.config import Config
from cr_proxy.edge.http import PREFIX
from cr_proxy.edge.resolve import parse_module_reference, parse_platform
from cr_proxy.ops.fetcher_client import (
    MIRROR_HEADERS,
    client_session,
    fetcher_socket,
    registry_error,
)


@dataclass(frozen=True, slots=True)
class ArtifactUrl:
    url: str
    digest: str
    content_type: str

    @property
    def sha256(self) -> str:
        return self.digest.removeprefix("sha256:")

    def as_dict(self) -> dict[str, str]:
        return {"url": self.url, "sha256": self.sha256, "digest": self.digest,
                "content_type": self.content_type}

    def text(self) -> str:
        return f"url: {self.url}\nsha256: {self.sha256}\n"


def artifact_path(reference: str, platform: str | None) -> str:
    """`/artifacts/<registry>/<repository>:<tag>[?platform=...]`, the
    reference in its canonical form (Docker's rules applied)."""
    query = f"?{urlencode({'platform': str(parse_platform(platform))})}" if platform else ""
    return f"{PREFIX}{quote(reference, safe='/:@')}{query}"


async def artifact_url(config: Config, text: str, platform: str | None, base: str) -> ArtifactUrl:
    ref = parse_module_reference(text, config.default_registry)
    path = artifact_path(str(ref), platform)
    async with (
        fetcher_socket(config) as (socket_path, _),
        client_session(socket_path, config) as session,
        session.get("http://fetcher" + path, headers=MIRROR_HEADERS) as response,
    ):
        if response.status != 200:
            raise registry_error(response.status, await response.read())
        digest = response.headers.get("Docker-Content-Digest", "")
        content_type = response.headers.get("Content-Type", "")
    return ArtifactUrl(base.rstrip("/") + path, digest, content_type)
