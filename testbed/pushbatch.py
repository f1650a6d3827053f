"""A kolla-like batch of images for push tests and the bench: `count`
images, one repository each, sharing two base layers and each with a small
layer of its own, in one OCI layout (one tag per image), pushed by skopeo
with a few pushers at once."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from testbed.crproxy import clean_env
from testbed.oci_layout import ImageInfo, build_image, tar_layer

PUSH_TIMEOUT = 600  # seconds one skopeo push may take (a loaded machine)


@dataclass(frozen=True)
class Batch:
    layout: Path
    images: list[ImageInfo]
    base_size: int  # bytes of each of the two shared base layers' files

    def tag(self, index: int) -> str:
        return self.images[index].tag

    @property
    def distinct_bytes(self) -> int:
        """The bytes every blob and manifest of the batch holds, each
        distinct digest once: what must cross to the registry at least."""
        sizes: dict[str, int] = {}
        for image in self.images:
            sizes.update(image.sizes)
        return sum(sizes.values())

    @property
    def repeated_bytes(self) -> int:
        """What pushing each image whole would send: every image's blobs."""
        return sum(sum(image.sizes.values()) for image in self.images)


def build_batch(layout: Path, count: int, base_size: int, seed: int = 0) -> Batch:
    """`count` images tagged i0..i<count-1>: two shared base layers of
    `base_size` random bytes each, plus 4 KiB of their own."""
    rng = random.Random(seed)
    bases = [tar_layer({f"base{n}.bin": rng.randbytes(base_size)}) for n in (1, 2)]
    images = [
        build_image(layout, layers=[*bases, tar_layer({f"app{i}.txt": os.urandom(4096)})],
                    tag=f"i{i}")
        for i in range(count)
    ]
    return Batch(layout, images, base_size)


def push_batch(
    batch: Batch, dest: Callable[[int], str], pushers: int,
    env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
) -> None:
    """skopeo copy of every image (index i to `dest(i)`, a docker:// name
    without the scheme), `pushers` at a time; raises with skopeo's output
    when one fails."""

    def push(index: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["skopeo", "copy", "--preserve-digests", "--retry-times", "0",
             "--dest-tls-verify=false", *extra,
             f"oci:{batch.layout}:{batch.tag(index)}", f"docker://{dest(index)}"],
            capture_output=True, text=True, env=env or clean_env(), timeout=PUSH_TIMEOUT,
            stdin=subprocess.DEVNULL, check=False)

    with ThreadPoolExecutor(pushers) as pool:
        results = list(pool.map(push, range(len(batch.images))))
    failed = [(i, r.stderr[-2000:]) for i, r in enumerate(results) if r.returncode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} pushes failed; the first: "
                           f"image {failed[0][0]}: {failed[0][1]}")
