"""warm's way to a fetcher: serve's if it runs, else one of our own in this
process; and the few requests warm makes of it.

Policy:

- If `cr-proxy serve` runs for this configuration (its `fetcher.sock`
  accepts a connection), its fetcher is used, so warm's downloads coalesce
  with client pulls (one upstream download per digest). Otherwise the
  fetcher app (the one serve runs) is started in-process on a private
  socket, `run/warm-<pid>.sock`, removed afterwards.
- Requests use the mirror path-prefix form (`/v2/<registry>/<name>/...`,
  `X-CR-Mode: mirror`).
- A manifest's body is checked against the digest asked for, or the one the
  fetcher names; a blob's bytes are hashed and dropped: a cut connection or
  bytes that do not match the digest is an error, even though the fetcher
  verifies too (it can only tell us by cutting the line).
- A subject's referrers are asked with `X-CR-Revalidate: 1`, so the
  fetcher asks the upstream (its API, else the tag schema's index tag,
  itself revalidated) and stores the answer, whatever its age.
- A fetcher's error answer becomes its registry error (`CODE: message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from cr_proxy.config import Config
from cr_proxy.errors import CrProxyError, ManifestInvalid
from cr_proxy.oci import manifest
from cr_proxy.oci.manifest import MANIFEST_ACCEPT, Manifest
from cr_proxy.oci.reference import Reference, digest_of, hasher, is_digest, names_registry
from cr_proxy.oci.referrers import INDEX_TYPE, Descriptor, parse_referrers
from cr_proxy.oci.tags import next_page

CHUNK = 1 << 20
MAX_TAG_PAGES = 100  # pages of one tag list warm stores (100 x distribution's 1000 tags)
MIRROR_HEADERS = {"X-CR-Mode": "mirror"}


def mirror_path(ref: Reference, kind: str, target: str) -> str:
    """The fetcher path for `ref`'s manifest or blob `target`. The registry
    goes in the path prefix when layout's prefix rule will see it as one;
    a registry name without a dot or colon goes in `?ns=` instead."""
    if names_registry(ref.registry):
        return f"/v2/{ref.registry}/{ref.name}/{kind}/{target}"
    return f"/v2/{ref.name}/{kind}/{target}?ns={ref.registry}"


def registry_error(status: int, body: bytes) -> CrProxyError:
    """The fetcher's registry-style error as `CODE: message`, or the status."""
    try:
        first = json.loads(body)["errors"][0]
        return CrProxyError(str(first.get("code") or "UNKNOWN"), str(first.get("message") or ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return CrProxyError(f"HTTP_{status}", f"the fetcher answered {status}")


@dataclass(frozen=True, slots=True)
class Fetched:
    """A manifest as the fetcher answered it."""

    digest: str
    manifest: Manifest
    cache: str  # the fetcher's X-Cache: HIT, MISS, STALE, REVALIDATED


class FetcherClient:
    """The requests warm makes, over one session to one fetcher."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def manifest(self, ref: Reference, target: str, revalidate: bool) -> Fetched:
        """GET a manifest (a tag with `X-CR-Revalidate: 1` when asked)."""
        fetched = await self.manifest_if_any(ref, target, revalidate, missing_ok=False)
        assert fetched is not None
        return fetched

    async def manifest_if_any(self, ref: Reference, target: str, revalidate: bool,
                              missing_ok: bool = True) -> Fetched | None:
        """manifest(), but None for a 404 (no such tag upstream, or not
        cached with the upstream down) when `missing_ok`."""
        headers = {**MIRROR_HEADERS, "Accept": MANIFEST_ACCEPT}
        if revalidate:
            headers["X-CR-Revalidate"] = "1"
        url = "http://fetcher" + mirror_path(ref, "manifests", target)
        async with self.session.get(url, headers=headers) as response:
            body = await response.read()
            if response.status == 404 and missing_ok:
                return None
            if response.status != 200:
                raise registry_error(response.status, body)
            claimed = response.headers.get("Docker-Content-Digest", "")
            content_type = response.content_type
            cache = response.headers.get("X-Cache", "")
        digest = _check_manifest(body, target if is_digest(target) else claimed)
        try:
            parsed = manifest.parse(body, content_type)
        except ManifestInvalid as err:
            raise ManifestInvalid(message=f"manifest {digest} is not a JSON object") from err
        return Fetched(digest, parsed, cache)

    async def referrers(self, ref: Reference, subject: str) -> tuple[list[Descriptor], str]:
        """The descriptors of `subject`'s referrers (fetched upstream and
        stored, or the stored answer when the upstream is down), and the
        fetcher's X-Cache."""
        headers = {**MIRROR_HEADERS, "Accept": INDEX_TYPE, "X-CR-Revalidate": "1"}
        url = "http://fetcher" + mirror_path(ref, "referrers", subject)
        async with self.session.get(url, headers=headers) as response:
            body = await response.read()
            if response.status != 200:
                raise registry_error(response.status, body)
            cache = response.headers.get("X-Cache", "")
        return parse_referrers(body, f"the referrers index of {ref.name}@{subject}"), cache

    async def tag_list(self, ref: Reference) -> str:
        """Fetch and store the repository's tag list as a client pages it
        with no `n`: the first page, then each page its Link names (up to
        MAX_TAG_PAGES), so that `skopeo list-tags` offline finds every
        page, and a whole list stands in for other paging (fetch/tags.py);
        the first page's X-Cache."""
        headers = {**MIRROR_HEADERS, "X-CR-Revalidate": "1"}
        path = mirror_path(ref, "tags", "list")
        query = ""
        first_cache: str | None = None
        asked = {query}
        for _ in range(MAX_TAG_PAGES):
            async with self.session.get("http://fetcher" + path + query,
                                        headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise registry_error(response.status, body)
                cache = response.headers.get("X-Cache", "")
                following = next_page(response.headers.get("Link"))
            first_cache = cache if first_cache is None else first_cache
            if following is None:
                break
            query = ("&" if "?" in path else "?") + urlencode(following.params())
            if query in asked:  # a Link back to a page asked: paging goes nowhere
                break
            asked.add(query)
        return first_cache or ""

    async def blob_cached(self, ref: Reference, digest: str) -> bool:
        """HEAD: a HIT costs nothing more. Anything else, an error included,
        goes on to the GET, whose body carries the error if there is one."""
        url = "http://fetcher" + mirror_path(ref, "blobs", digest)
        head_headers = {**MIRROR_HEADERS, "X-CR-Cache-Only": "1"}
        async with self.session.head(url, headers=head_headers) as response:
            return response.status == 200 and response.headers.get("X-Cache") == "HIT"

    async def download(self, ref: Reference, digest: str, size: int | None,
                       advance: Callable[[int], None]) -> tuple[int, str]:
        """GET the blob, hash it and drop it; (bytes, X-Cache). `advance`
        hears of every chunk's length."""
        url = "http://fetcher" + mirror_path(ref, "blobs", digest)
        async with self.session.get(url, headers=MIRROR_HEADERS) as response:
            if response.status != 200:
                raise registry_error(response.status, await response.read())
            cache = response.headers.get("X-Cache", "")
            digester, nbytes = hasher(digest), 0
            try:
                async for chunk in response.content.iter_chunked(CHUNK):
                    digester.update(chunk)
                    nbytes += len(chunk)
                    advance(len(chunk))
            except aiohttp.ClientPayloadError as err:
                raise CrProxyError("TRUNCATED", f"blob {digest}: connection cut after "
                                   f"{nbytes} bytes (the fetcher found it short or wrong)"
                                   ) from err
        actual = f"{digest.split(':', 1)[0]}:{digester.hexdigest()}"
        if actual != digest or (size is not None and nbytes != size):
            raise CrProxyError("DIGEST_INVALID", f"blob {digest}: received {nbytes} bytes "
                               f"hashing to {actual}")
        return nbytes, cache


def _check_manifest(body: bytes, expected: str) -> str:
    """The body's digest, checked against the one asked for or claimed."""
    algorithm = expected.split(":", 1)[0] if is_digest(expected) else "sha256"
    digest = digest_of(body, algorithm)
    if is_digest(expected) and digest != expected:
        raise CrProxyError("DIGEST_INVALID", f"manifest is {digest}, expected {expected}")
    return digest


def client_session(socket_path: Path, config: Config) -> aiohttp.ClientSession:
    # The fetcher times the upstream out first; this only catches a fetcher
    # that hangs (connect + token exchange + redirects + a silent read).
    read = config.timeouts.connect * 3 + config.timeouts.read * 2
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket_path)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read),
        auto_decompress=False,  # hash the bytes as stored
    )


async def serve_is_running(socket_path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError:  # no socket file, or a stale one nobody listens on
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def fetcher_socket(config: Config) -> AsyncIterator[tuple[Path, bool]]:
    """(socket, started here): serve's fetcher if it runs, else our own."""
    if await serve_is_running(config.socket_path):
        yield config.socket_path, False
        return
    from cr_proxy.edge.http import make_app  # the same app serve runs

    path = config.run_dir / f"warm-{os.getpid()}.sock"
    runner = web.AppRunner(
        make_app(config, clean_temp=False), access_log=None, handle_signals=False
    )
    try:
        try:
            config.run_dir.mkdir(parents=True, exist_ok=True)
            await runner.setup()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            await web.UnixSite(runner, str(path)).start()
        except OSError as err:
            raise CrProxyError("FETCHER", f"cannot start a fetcher on {path}: {err}") from err
        yield path, True
    finally:
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
