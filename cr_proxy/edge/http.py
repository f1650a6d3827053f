"""`GET|HEAD /artifacts/<registry>/<repository>:<tag>` (or `@<digest>`,
`?platform=os/arch`) on the mirror ports: a module over plain HTTP.

nginx hands these to the fetcher (nginx/mirror.conf), which only resolves
(resolve.py: the manifest and the layer, the blob cached first if it was
not) and answers with `X-Accel-Redirect` to an internal location over the
blob's file: nginx sends the bytes (sendfile, Range and 206, HEAD) with
ETag and Docker-Content-Digest = the digest, and Content-Type
application/wasm for a Wasm layer (application/octet-stream otherwise,
which the fetcher names and nginx keeps). `If-None-Match` with the digest
is answered 304 here: nginx's own ETag check knows only its own ETag.

The internal location serves the digest store's file and logs the
repository's name of it, so nginx's usage feed records the use for LRU
eviction whether or not the name is linked yet. A digest nginx has no
location for (sha512) is sent by the fetcher itself, Range included.

With artifacts.signed_urls on, only `/artifacts/s/<token>` is served
(signing.py: the token names the digest, so no resolution is needed);
`cr-proxy artifact-url` asks this route on the fetcher's socket with
`X-CR-Artifact-Url: 1`, which nginx never passes on, and gets the URL's
path (signed when they are on) as JSON instead of the bytes.
"""

from __future__ import annotations

import time
from urllib.parse import quote, urlencode

from aiohttp import web

from cr_proxy.cache.layout import Kind, v2_path
from cr_proxy.config import Config
from cr_proxy.edge import signing
from cr_proxy.edge.resolve import (
    WASM_CONTENT_TYPE,
    Module,
    learn_privacy,
    parse_platform,
    resolve,
    target_of,
)
from cr_proxy.errors import NotFound, Unsupported
from cr_proxy.fetch.app import Fetcher
from cr_proxy.fetch.app import make_app as make_fetch_app
from cr_proxy.fetch.context import API_HEADERS, in_thread
from cr_proxy.metrics import Metrics
from cr_proxy.oci.reference import parse_reference

PREFIX = "/artifacts/"
SIGNED = "s/"  # /artifacts/s/<token>: a signed URL (signing.py)
INTERNAL = "/_cr/artifact/"


def internal_uri(module: Module) -> str | None:
    """Where nginx's internal location finds the module (sha256 only):
    the cache's <domain> and the blob's path under it."""
    if not module.digest.startswith("sha256:"):
        return None
    return f"{INTERNAL}{module.domain}/{v2_path(module.repository, Kind.BLOB, module.digest)}"


def etag(digest: str) -> str:
    return f'"{digest}"'


def not_modified(request: web.Request, digest: str) -> bool:
    """If-None-Match names this digest's ETag (or `*`)."""
    header = request.headers.get("If-None-Match", "")
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag(digest) in tags


def module_response(request: web.Request, module: Module) -> web.StreamResponse:
    headers = {"ETag": etag(module.digest), "Docker-Content-Digest": module.digest,
               "Content-Type": module.content_type, **API_HEADERS}
    if not_modified(request, module.digest):
        return web.Response(status=304, headers=headers)
    uri = internal_uri(module)
    if uri is None:
        return web.FileResponse(module.path, headers=headers)
    # nginx keeps Content-Type from this answer and adds the rest itself.
    return web.Response(headers={**headers, "X-Accel-Redirect": uri})


class ArtifactRoute:
    """The `/artifacts/` route: the plain one, and the signed one when
    artifacts.signed_urls is on (signing.py)."""

    __slots__ = ("config", "key")

    def __init__(self, config: Config) -> None:
        self.config = config
        # Made at first start, so URLs signed before a restart stay valid.
        self.key = signing.ensure_key(signing.key_path(config))

    def __repr__(self) -> str:
        return f"<ArtifactRoute signed_urls={self.config.artifacts.signed_urls}>"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fetcher: Fetcher = request.app["fetcher"]
        if request.headers.get("X-CR-Mode", "mirror") != "mirror":
            # https_proxy mode: the path is an upstream's own, not ours.
            return await fetcher.handle(request)
        return await fetcher.answer(request, self._answer(request, fetcher))

    async def _answer(self, request: web.Request, fetcher: Fetcher) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(message="artifacts are read-only: GET or HEAD")
        rest = request.path[len(PREFIX):]
        if rest.startswith(SIGNED):
            if not self.config.artifacts.signed_urls:
                raise NotFound("UNSUPPORTED", "signed URLs are off (artifacts.signed_urls)")
            grant = signing.verify(self.key, rest[len(SIGNED):])
            return module_response(request, await self._granted(fetcher, grant))
        # X-CR-Artifact-Url: `cr-proxy artifact-url` on the fetcher's socket
        # (nginx drops a client's copy: fetch.conf).
        operator = request.headers.get("X-CR-Artifact-Url") == "1"
        if self.config.artifacts.signed_urls and not operator:
            raise signing.Forbidden(message="only signed URLs are served here "
                                    "(artifacts.signed_urls): ask cr-proxy artifact-url")
        platform = request.query.get("platform") or None
        module = await resolve(fetcher, rest, platform)
        if operator:
            return web.json_response(self._url_of(module, platform))
        return module_response(request, module)

    async def _granted(self, fetcher: Fetcher, grant: signing.Grant) -> Module:
        """The module a genuine token names: its digest, from its repository."""
        ref = parse_reference(grant.reference, fetcher.ctx.config.default_registry)
        target = target_of(fetcher, ref, Kind.BLOB, grant.digest)
        await learn_privacy(fetcher, target)
        path = await fetcher.blobs.ensure(target)
        size = (await in_thread(path.stat)).st_size
        media_type = WASM_CONTENT_TYPE if grant.wasm else ""
        return Module(ref, "", grant.digest, size, media_type, target.domain, path)

    def _url_of(self, module: Module, platform: str | None) -> dict[str, str]:
        """What artifact-url prints: the path (signed when signed_urls is
        on), the digest, the type."""
        if self.config.artifacts.signed_urls:
            expires = int(time.time() + self.config.artifacts.url_ttl)
            grant = signing.Grant(str(module.reference), module.digest, module.is_wasm, expires)
            path = f"{PREFIX}{SIGNED}{signing.sign(self.key, grant)}"
        else:
            path = artifact_path(str(module.reference), platform)
        return {"path": path, "digest": module.digest, "content_type": module.content_type}


def artifact_path(reference: str, platform: str | None) -> str:
    """`/artifacts/<registry>/<repository>:<tag>[?platform=...]`."""
    query = f"?{urlencode({'platform': str(parse_platform(platform))})}" if platform else ""
    return f"{PREFIX}{quote(reference, safe='/:@')}{query}"


def make_app(config: Config, metrics: Metrics | None = None,
             clean_temp: bool = True) -> web.Application:
    """The fetcher's app (fetch/app.py) with the artifact route before its
    catch-all: what serve runs, and warm's in-process fetcher."""
    route = ArtifactRoute(config)
    return make_fetch_app(config, metrics, clean_temp,
                          routes=((f"{PREFIX}{{tail:.*}}", route.handle),))
