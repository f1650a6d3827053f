"""`cr-proxy ls`, `du` and `rm` on the cache of a running cr-proxy, after
real skopeo pulls through it. The cache is the session's: other tests'
images may be in it too, so every check is about our images or is
computed from the tree itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from testbed.crproxy import CrProxy, layout_blobs, skopeo_pull
from tests.conftest import Images

SMALL = "registry.test/small:v1"
OTHER = "registry.test/other/app:v1"
# A line of the small image's, from a client that named the mirror {host}.
SMALL_LINE_RE = (
    r'"(?:GET|HEAD) /v2/registry\.test/small/(\S+) HTTP[^"]*".* type=(\S+) cache=(\S+) host={host} '
)


def cr_proxy(proxy: CrProxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cr_proxy", *args, "--config", str(proxy.config_path)],
        capture_output=True, text=True, timeout=120,
    )


def cr_proxy_json(proxy: CrProxy, *args: str) -> dict[str, Any]:
    result = cr_proxy(proxy, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def blob_file(proxy: CrProxy, digest: str) -> Path:
    return proxy.cache / "blobs/sha256" / digest.split(":")[1]


def inode_sizes(*tops: Path) -> tuple[int, int]:
    """(bytes of the distinct inodes below tops, bytes of every file)."""
    sizes, naive = {}, 0
    for path in (p for top in tops for p in top.rglob("*")):
        if path.is_file():
            st = path.stat()
            sizes[st.st_ino] = st.st_size
            naive += st.st_size
    return sum(sizes.values()), naive


def cached_requests(proxy: CrProxy, host: str, want: int) -> list[tuple[str, str, str]]:
    """(path tail, request type, X-Cache) of the small image's requests that
    came with this Host, once at least `want` of them are in the access log."""
    pattern = re.compile(SMALL_LINE_RE.format(host=re.escape(host)))
    lines = proxy.access_lines(pattern, at_least=want)
    return [m.groups() for m in map(pattern.search, lines) if m]


def test_ls_du_rm_on_a_live_cache(proxy: CrProxy, images: Images, tmp_path: Path) -> None:
    for ref in (SMALL, OTHER):
        result = skopeo_pull(f"{proxy.http}/{ref}", tmp_path / ref.replace("/", "_"))
        assert result.returncode == 0, result.stderr
    for repo, image in (("small", images.small), ("other/app", images.other)):
        proxy.wait_committed("registry.test", repo, image.config_digest, *image.layer_digests)

    listed = {image["key"]: image for image in cr_proxy_json(proxy, "ls")["images"]}
    small = listed[SMALL]
    assert (small["name"], small["digest"]) == (SMALL, images.small.manifest_digest)
    assert small["platforms"] == ["linux/amd64"]
    assert small["size"] == sum(images.small.sizes.values())
    assert small["missing"] == []
    assert images.shared_layer in set(small["blobs"]) & set(listed[OTHER]["blobs"])

    # du counts by inode: the shared layer, linked under both repositories
    # (and the CDN host), is in the sum once.
    usage = cr_proxy_json(proxy, "du")
    [registry] = [d for d in usage["domains"] if d["domain"] == "registry.test"]
    distinct, naive = inode_sizes(proxy.cache / "content/registry.test")
    assert registry["bytes"] == distinct
    assert naive - distinct >= images.small.sizes[images.shared_layer]
    everything, _ = inode_sizes(proxy.cache / "blobs", proxy.cache / "content")
    assert usage["total"]["bytes"] == everything

    result = cr_proxy(proxy, "rm", "--json", OTHER)
    assert result.returncode == 0, result.stderr
    removed = json.loads(result.stdout)
    own = images.other.layer_digests[1]
    assert removed["images"] == [OTHER]
    assert own in removed["blobs"] and images.shared_layer not in removed["blobs"]
    assert not blob_file(proxy, own).exists()
    assert not (proxy.cache / f"content/registry.test/v2/other/app/blobs/{own}").exists()
    # It came through the upstream's CDN redirect: that name and record go too.
    assert not (proxy.cache / f"redirect/registry.test/v2/other/app/blobs/{own}").exists()
    assert not list((proxy.cache / "content/cdn.test").rglob(f"{own.split(':')[1]}/data"))
    assert blob_file(proxy, images.shared_layer).exists()
    keys = {image["key"] for image in cr_proxy_json(proxy, "ls")["images"]}
    assert SMALL in keys and OTHER not in keys

    # The image left still pulls, and wholly from the cache (X-Cache: HIT).
    # The pull names the mirror "localhost" so that its lines are told from
    # the first pull's by host= (nginx workers flush their buffered lines
    # independently: order in the file is not order in time).
    result = skopeo_pull(f"localhost:{proxy.http_port}/{SMALL}", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    pulled = layout_blobs(tmp_path / "again")
    assert {images.small.manifest_digest, images.shared_layer} <= set(pulled)
    requests = cached_requests(proxy, "localhost", want=1 + len(images.small.layer_digests) + 1)
    assert any(path.startswith("blobs/") for path, _, _ in requests)
    # Every answer came from the cache (nginx, or the fetcher linking a
    # stored blob whose commit the earlier pull raced): never upstream.
    assert all(kind.split("-")[0] in ("manifest", "blob") for _, kind, _ in requests), requests
    assert all(cache == "HIT" for _, _, cache in requests), requests
