"""`cr-proxy artifact-url REF`: the URL a client without registry
credentials (Envoy's remote Wasm source, a device) fetches a module from,
and the sha256 it checks it against.

The module is resolved by a fetcher (serve's, or one in this process:
fetcher_client.py) on its `/artifacts/` route, with `X-CR-Artifact-Url: 1`
(which nginx never passes on): the fetcher caches the blob through the path
a client's GET takes and answers with the URL's path, signed when
artifacts.signed_urls is on (the key never leaves the fetcher's code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, urlencode

from cr_proxy.config import Config
from cr_proxy.edge.http import PREFIX
from cr_proxy.edge.resolve import parse_module_reference
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


async def artifact_url(config: Config, text: str, platform: str | None, base: str) -> ArtifactUrl:
    ref = parse_module_reference(text, config.default_registry)
    query = f"?{urlencode({'platform': platform})}" if platform else ""
    path = f"{PREFIX}{quote(str(ref), safe='/:@')}{query}"
    async with (
        fetcher_socket(config) as (socket_path, _),
        client_session(socket_path, config) as session,
        session.get("http://fetcher" + path,
                    headers={**MIRROR_HEADERS, "X-CR-Artifact-Url": "1"}) as response,
    ):
        body = await response.read()
        if response.status != 200:
            raise registry_error(response.status, body)
    answer = json.loads(body)
    return ArtifactUrl(base.rstrip("/") + answer["path"], answer["digest"],
                       answer["content_type"])
