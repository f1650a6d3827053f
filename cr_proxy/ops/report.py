"""What `cr-proxy ls|du|rm|verify|check` print: a JSON document (`--json`) or a
table for people, from the cache's results (cache/inventory.py and the
modules it calls).

JSON (`--json`; keys are stable, new ones may be added):

    ls      {"images": [{"key", "name", "registry", "domain", "repository",
                         "tag" (null for a digest-only image), "digest",
                         "media_type", "platforms": [str], "size",
                         "blobs": [digest], "missing": [digest],
                         "last_used" (Unix time, float),
                         "complete": bool, "not_pulled": [digest],
                         "cached_platforms": [str],
                         "missing_bytes" (int, or null if unknown),
                         "pinned": bool, "private": bool}]}

            `missing`: used digests not in blobs/, the manifests of an
            index's platforms never pulled included (those are also in
            `not_pulled`). `complete`: nothing else is missing.
            `missing_bytes`: what the manifests state for the rest.
    du      {"domains": [{"domain", "registry", "files", "bytes"}],
             "total": {"files", "bytes"}, "unlinked": {"files", "bytes"}}
    rm      {"images": [key], "blobs": [digest], "files", "bytes"}
    verify  {"checked", "bytes", "failures": [{"digest", "actual" (null if
             unreadable), "quarantined" (path or null), "removed": [path]}]}
    pin     {"pinned": [key]}      unpin  {"unpinned": [key], "declared": [key],
                                            "not_pinned": [key]}
    check   {"images": [{"image" (as given), "name", "digest" (null: not
             cached), "complete": bool, "platforms": [str],
             "missing": [{"what" ("manifest", "blob", "platform"), "name",
             "reason"}]}], "complete": bool}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from cr_proxy.cache.check import Checked
from cr_proxy.cache.diskuse import DiskUsage, Usage
from cr_proxy.cache.image import Image
from cr_proxy.cache.removal import Removed
from cr_proxy.cache.sizes import human_size
from cr_proxy.cache.verify import Verification

# --- JSON documents -----------------------------------------------------------------


def images_document(images: Iterable[Image], pinned: AbstractSet[str] = frozenset()
                    ) -> dict[str, Any]:
    return {"images": [
        {
            "key": i.key, "name": i.name, "registry": i.registry, "domain": i.domain,
            "repository": i.repository, "tag": i.tag, "digest": i.digest,
            "media_type": i.media_type, "platforms": list(i.platforms), "size": i.size,
            "blobs": sorted(i.digests), "missing": sorted(i.missing), "last_used": i.last_used,
            "complete": i.complete, "not_pulled": sorted(i.unpulled),
            "cached_platforms": list(i.cached_platforms), "missing_bytes": i.missing_bytes,
            "pinned": i.key in pinned, "private": i.private,
        }
        for i in images
    ]}


def usage_document(usage: DiskUsage) -> dict[str, Any]:
    return {
        "domains": [{"domain": d.domain, "registry": d.registry, **_counts(d.usage)}
                    for d in usage.domains],
        "total": _counts(usage.total),
        "unlinked": _counts(usage.unlinked),
        "lists": _counts(usage.lists),
    }


def removed_document(removed: Removed) -> dict[str, Any]:
    return {"images": list(removed.images), "blobs": list(removed.blobs),
            "files": removed.files, "bytes": removed.bytes}


def verification_document(result: Verification) -> dict[str, Any]:
    return {"checked": result.checked, "bytes": result.bytes, "failures": [
        {"digest": f.digest, "actual": f.actual,
         "quarantined": str(f.quarantined) if f.quarantined else None,
         "removed": list(f.removed)}
        for f in result.failures
    ]}


def _counts(usage: Usage) -> dict[str, int]:
    return {"files": usage.files, "bytes": usage.bytes}


# --- tables and text ----------------------------------------------------------------


def images_table(images: Iterable[Image], pinned: AbstractSet[str] = frozenset()) -> str:
    rows = [
        (i.name, short(i.digest), ",".join(i.platforms) or "-", image_size(i),
         state(i) + (", pinned" if i.key in pinned else "") + (", private" if i.private else ""),
         when(i.last_used))
        for i in images
    ]
    return table(("IMAGE", "DIGEST", "PLATFORMS", "SIZE", "STATE", "LAST USED"), rows,
                 right={3})


def state(image: Image) -> str:
    """`complete`, or `N missing` (digests of what was pulled not in
    blobs/); `, K of M platforms` when an index's other platforms were never
    pulled: a mirror holds what its clients asked for, that is no damage."""
    text = "complete" if image.complete else f"{len(image.lost)} missing"
    pulled, named = len(image.cached_platforms), len(image.platforms)
    if pulled < named:
        text += f", {pulled} of {named} platforms"
    return text


def image_size(image: Image) -> str:
    """The bytes in the cache; of an incomplete image, also what it would
    take whole (`?` when a missing manifest hides its blobs' sizes)."""
    if image.complete:
        return human_size(image.size)
    if image.missing_bytes is None:
        return f"{human_size(image.size)} of ?"
    return f"{human_size(image.size)} of {human_size(image.size + image.missing_bytes)}"


def usage_table(usage: DiskUsage) -> str:
    rows = [(d.registry, d.domain, str(d.usage.files), human_size(d.usage.bytes))
            for d in usage.domains]
    rows.append(("unlinked", "blobs/", str(usage.unlinked.files), human_size(usage.unlinked.bytes)))
    rows.append(("listings", "lists/", str(usage.lists.files), human_size(usage.lists.bytes)))
    rows.append(("total", "(each blob once)", str(usage.total.files),
                 human_size(usage.total.bytes)))
    return table(("REGISTRY", "DOMAIN", "FILES", "SIZE"), rows, right={2, 3})


def removed_text(removed: Removed) -> str:
    lines = [f"removed {key}" for key in removed.images]
    lines.append(f"freed {len(removed.blobs)} blobs, {human_size(removed.bytes)} "
                 f"({removed.files} files unlinked)")
    return "\n".join(lines)


def verification_text(result: Verification) -> str:
    lines = [
        f"CORRUPT {f.digest}: content is {f.actual}; moved to {f.quarantined}, "
        f"{len(f.removed)} names removed"
        for f in result.failures
    ]
    lines.append(f"checked {result.checked} blobs ({human_size(result.bytes)}): "
                 f"{len(result.failures) or 'none'} corrupt")
    return "\n".join(lines)


def check_document(checked: Iterable[Checked]) -> dict[str, Any]:
    images = [
        {"image": c.image, "name": c.name, "digest": c.digest, "complete": c.complete,
         "platforms": list(c.platforms),
         "missing": [{"what": m.what, "name": m.name, "reason": m.reason} for m in c.missing]}
        for c in checked
    ]
    return {"images": images, "complete": all(i["complete"] for i in images)}


def check_text(checked: Iterable[Checked]) -> str:
    """One line per image, `complete` or `INCOMPLETE`, then what is missing."""
    lines = []
    for c in checked:
        platforms = f" ({', '.join(c.platforms)})" if c.platforms else ""
        if c.complete:
            lines.append(f"complete    {c.name}{platforms}")
            continue
        lines.append(f"INCOMPLETE  {c.name}{platforms}: {len(c.missing)} missing")
        lines += [f"  {m}" for m in c.missing]
    return "\n".join(lines)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> str:
    """Columns padded to their widest cell; `right` columns aligned right."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if c in right else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [header, *rows])


def short(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def when(timestamp: float) -> str:
    if timestamp <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def output(document: dict[str, Any], text: str, as_json: bool) -> str:
    """What a command prints: the JSON document (--json) or the text."""
    return json.dumps(document, indent=2) if as_json else text
