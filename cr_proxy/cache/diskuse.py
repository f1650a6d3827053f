"""Disk use of the cache tree (`cr-proxy du`), from one scan.

Policy: every distinct inode under content/<domain> (a blob linked by ten
repositories once), per domain; the total counts each inode under blobs/
and content/ once, so rows overlap when domains share blobs. `unlinked` is
what blobs/ holds that no content/ name links to. The stored listings
(lists/<domain>/: tag list pages and referrers answers) count in their
domain's row and in the total, and are shown apart (`lists`). Sizes are
apparent file sizes; sidecars (a few bytes each) are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cr_proxy.cache.scan import Scan


@dataclass(frozen=True, slots=True)
class Usage:
    files: int = 0  # distinct inodes
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class DomainUsage:
    domain: str
    registry: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class DiskUsage:
    domains: tuple[DomainUsage, ...]
    total: Usage  # blobs/ and content/, each inode once, and lists/
    unlinked: Usage  # blobs/ files no content/ name links to
    lists: Usage = Usage()  # lists/: stored tag lists and referrers answers


def disk_usage(scan: Scan, registry_of: Callable[[str], str],
               lists: Mapping[str, tuple[int, int]] | None = None) -> DiskUsage:
    """`registry_of` names the registry a domain is shown as; `lists`: per
    domain, the (files, bytes) of its stored listings."""
    lists = lists or {}
    per_domain: dict[str, dict[int, int]] = defaultdict(dict)
    for link in scan.links:
        per_domain[link.domain][link.inode] = link.size
    everything = {b.inode: b.size for b in scan.blobs.values()}
    for sizes in per_domain.values():
        everything.update(sizes)
    linked = {link.inode for link in scan.links}
    unlinked = [b.size for b in scan.blobs.values() if b.inode not in linked]
    domains = tuple(
        DomainUsage(domain, registry_of(domain),
                    _plus(_usage(per_domain.get(domain, {}).values()), lists.get(domain)))
        for domain in sorted(per_domain.keys() | lists.keys())
    )
    listed = Usage(sum(f for f, _ in lists.values()), sum(b for _, b in lists.values()))
    total = _usage(everything.values())
    return DiskUsage(domains, _plus(total, (listed.files, listed.bytes)), _usage(unlinked),
                     listed)


def _plus(usage: Usage, more: tuple[int, int] | None) -> Usage:
    files, nbytes = more or (0, 0)
    return Usage(usage.files + files, usage.bytes + nbytes)


def _usage(sizes: Iterable[int]) -> Usage:
    sizes = list(sizes)
    return Usage(len(sizes), sum(sizes))
