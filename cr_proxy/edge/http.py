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
"""

from __future__ import annotations

from aiohttp import web

from cr_proxy.cache.layout import Kind, v2_path
from cr_proxy.config import Config
from cr_proxy.edge.resolve import Module, resolve
from cr_proxy.errors import Unsupported
from cr_proxy.fetch.app import Fetcher
from cr_proxy.fetch.app import make_app as make_fetch_app
from cr_proxy.fetch.context import API_HEADERS
from cr_proxy.metrics import Metrics

PREFIX = "/artifacts/"
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


async def handle_artifact(request: web.Request) -> web.StreamResponse:
    fetcher: Fetcher = request.app["fetcher"]
    if request.headers.get("X-CR-Mode", "mirror") != "mirror":
        # https_proxy mode: the path is an upstream's own, not ours.
        return await fetcher.handle(request)
    return await fetcher.answer(request, _artifact(request, fetcher))


async def _artifact(request: web.Request, fetcher: Fetcher) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        raise Unsupported(message="artifacts are read-only: GET or HEAD")
    text = request.path[len(PREFIX):]
    module = await resolve(fetcher, text, request.query.get("platform") or None)
    return module_response(request, module)


def make_app(config: Config, metrics: Metrics | None = None,
             clean_temp: bool = True) -> web.Application:
    """The fetcher's app (fetch/app.py) with the artifact route before its
    catch-all: what serve runs, and warm's in-process fetcher."""
    return make_fetch_app(config, metrics, clean_temp,
                          routes=((f"{PREFIX}{{tail:.*}}", handle_artifact),))
