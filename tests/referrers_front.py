"""Referrers for the tests: OCI artifacts pushed by HTTP to the real
registry (testbed/registry.py, Debian's CNCF distribution 2.8, which has no
referrers API), the spec's tag schema kept beside them, and a small
loopback front that adds the referrers API, and only it, to that registry.

- `push_blob`, `push_manifest`: a monolithic blob upload and a manifest
  PUT, with a push token minted by the testbed's token server.
- `Artifact`: a signature or an attestation (an image manifest with
  `artifactType`, an empty config and `subject`), as pushed.
- `ReferrersFront`: answers `GET /v2/<name>/referrers/<digest>` from what
  the test registered (the spec's answer: an index, `artifactType`
  filtered with OCI-Filters-Applied, in pages with a Link when
  `page_size` is set), relays anything else to the
  registry as it is (its 401 and challenge included, so clients log in
  with the registry's own token server).
"""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from testbed.oci_layout import MT_INDEX, MT_MANIFEST, sha256_digest
from testbed.ports import free_ports
from testbed.registry import LoopThread, Upstream

EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
SIGNATURE_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
ATTESTATION_TYPE = "application/vnd.in-toto+json"
RELAYED = frozenset({"accept", "authorization", "content-type", "content-length"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-encoding"})


def _request(upstream: Upstream, repo: str, method: str, url: str, body: bytes,
             content_type: str) -> str:
    """One push request with a push token; the answer's Location."""
    token = upstream.issue_token([f"repository:{repo}:push,pull"])
    request = urllib.request.Request(
        urljoin(upstream.registry_url, url), data=body, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status in (201, 202), (url, answer.status)
        return answer.headers.get("Location", "")


def push_blob(upstream: Upstream, repo: str, data: bytes) -> str:
    """POST an upload, then PUT it whole (distribution 2.8 has no
    single-request upload)."""
    digest = sha256_digest(data)
    location = _request(upstream, repo, "POST", f"/v2/{repo}/blobs/uploads/", b"",
                        "application/octet-stream")
    separator = "&" if "?" in location else "?"
    _request(upstream, repo, "PUT", f"{location}{separator}digest={digest}", data,
             "application/octet-stream")
    return digest


def push_manifest(upstream: Upstream, repo: str, ref: str, body: bytes, media_type: str) -> str:
    _request(upstream, repo, "PUT", f"/v2/{repo}/manifests/{ref}", body, media_type)
    return sha256_digest(body)


def descriptor(media_type: str, body: bytes, **extra: object) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(body), "size": len(body), **extra}


@dataclass
class Artifact:
    artifact_type: str
    manifest: bytes
    layer: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        return descriptor(MT_MANIFEST, self.manifest, artifactType=self.artifact_type)


def push_artifact(upstream: Upstream, repo: str, subject: dict[str, Any],
                  artifact_type: str, payload: bytes) -> Artifact:
    """An OCI 1.1 artifact manifest naming `subject`, pushed by digest."""
    push_blob(upstream, repo, EMPTY)
    push_blob(upstream, repo, payload)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST, "artifactType": artifact_type,
        "config": descriptor(EMPTY_TYPE, EMPTY),
        "layers": [descriptor(artifact_type, payload)],
        "subject": subject,
    }).encode()
    push_manifest(upstream, repo, sha256_digest(manifest), manifest, MT_MANIFEST)
    return Artifact(artifact_type, manifest, payload)


def push_tag_schema(upstream: Upstream, repo: str, subject_digest: str,
                    artifacts: list[Artifact]) -> str:
    """The spec's fallback for a registry without the API: the index of a
    subject's referrers under the tag `sha256-<hex>`."""
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX,
                        "manifests": [a.descriptor() for a in artifacts]}).encode()
    return push_manifest(upstream, repo, subject_digest.replace(":", "-"), index, MT_INDEX)


class ReferrersFront:
    """The registry plus the referrers API; see the module docstring."""

    def __init__(self, upstream: Upstream) -> None:
        self.registry_url = upstream.registry_url
        (self.port,) = free_ports(1)
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.asked: Counter[str] = Counter()  # referrers requests, by subject
        self.page_size = 0  # > 0: answers in pages of that many descriptors
        self._loop: LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._loop = self._loop or LoopThread()
        self._runner = self._loop.run(self._start())

    def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and self._loop is not None:
            self._loop.run(runner.cleanup())

    def close(self) -> None:
        self.stop()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> ReferrersFront:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _start(self) -> web.AppRunner:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get(r"/v2/{name:.+}/referrers/{digest}", self._referrers)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        app.on_cleanup.append(self._close_session)
        runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        return runner

    async def _close_session(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _referrers(self, request: web.Request) -> web.Response:
        subject = request.match_info["digest"]
        self.asked[subject] += 1
        found = self.referrers.get((request.match_info["name"], subject), [])
        headers = {}
        wanted = request.query.get("artifactType")
        if wanted is not None:
            found = [d for d in found if d.get("artifactType") == wanted]
            headers["OCI-Filters-Applied"] = "artifactType"
        if self.page_size:
            # In pages (the spec's Link), each after the last digest sent.
            last = request.query.get("last")
            start = next((i + 1 for i, d in enumerate(found) if d["digest"] == last), 0)
            found, more = found[start:start + self.page_size], found[start + self.page_size:]
            if more:
                params = urlencode({"last": found[-1]["digest"],
                                    **({"artifactType": wanted} if wanted else {})})
                headers["Link"] = f'<{request.path}?{params}>; rel="next"'
        body = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": found})
        return web.Response(text=body, content_type=MT_INDEX, headers=headers)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() in RELAYED)
        body = await request.read() if request.body_exists else None
        async with self._session.request(
            request.method, self.registry_url + request.path_qs, headers=headers, data=body,
            allow_redirects=False,
        ) as answer:
            data = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
            return web.Response(status=answer.status, body=data, headers=kept)
