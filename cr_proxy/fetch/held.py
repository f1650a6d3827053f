"""What each registry holds, as far as pushes need to know: which
repositories the upstream confirmed a digest in, and which digests a push
is uploading right now (push.py's dedup across images).

Policy:
- Remembered per registry (the cache's <domain>): digest -> repositories,
  and the blob's size. A final PUT the upstream answered 201 (digest
  matched), a mount it answered 201, a HEAD it answered 200 add to it.
- A restart loses nothing that matters: the tree is the persistent record.
  A blob name content/<domain>/v2/<repository>/blobs/<digest> exists only
  once that upstream confirmed the digest there (pulled: its HEAD or GET;
  pushed: its 201), so the first push probe of a registry reads its names
  from the tree (one walk of content/<domain>/, in a thread). Eviction
  removing a name forgets nothing the upstream still holds that a memory
  could not also lose; the worst case of forgetting is an upload again.
- What the upstream may have lost since (a registry's garbage collection)
  is found when a mount fails: the repository is forgotten for the digest.
- An upload in progress is a claim on its digest in its registry: a second
  pusher's probe of that digest waits for the claim to end (the first
  upload done: then a mount), as pull misses join one download. A claim
  ends at its final PUT, whatever the upstream answered, or when its
  repository has had no upload or manifest request in progress for
  CLAIM_IDLE seconds (a pusher that died, or two that each wait for the
  other's claim): the waiter then uploads itself. Probes are not activity:
  a probe may itself be waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cr_proxy.cache.layout import Kind, key_of
from cr_proxy.cache.scan import lstat, walk_files
from cr_proxy.cache.store import Store
from cr_proxy.errors import BadRequest
from cr_proxy.fetch.context import in_thread

log = logging.getLogger("cr_proxy.push")

# Seconds a claim's repository may see no push request before the claim is
# taken for abandoned. A live upload sends its body continuously (or holds a
# request open while it streams), so a silence this long is a dead pusher;
# short enough that the waiter's own push does not time out behind it.
CLAIM_IDLE = 30.0
CLAIM_POLL = 1.0  # seconds between a waiter's looks at a claim's liveness


@dataclass(slots=True)
class Claim:
    """An upload of a digest the upstream does not hold, in progress."""

    name: str  # the claimant's repository
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Activity:
    requests: int = 0  # push requests in progress
    last: float = field(default_factory=time.monotonic)


class Held:
    __slots__ = ("_activity", "_claims", "_load_lock", "_loaded", "_repos", "_sizes", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        # domain -> digest -> repositories the upstream holds it in
        self._repos: dict[str, defaultdict[str, set[str]]] = {}
        # (domain, digest) -> size, as that registry said it (or our copy
        # does): one registry's HEAD is never another's answer.
        self._sizes: dict[tuple[str, str], int] = {}
        self._loaded: set[str] = set()
        self._load_lock = asyncio.Lock()
        self._claims: dict[tuple[str, str], Claim] = {}  # (domain, digest) -> claim
        self._activity: dict[tuple[str, str], Activity] = {}  # (domain, name) -> activity

    def __repr__(self) -> str:
        return f"<Held {len(self._repos)} registries, {len(self._claims)} claims>"

    # --- what the upstream holds ------------------------------------------------

    async def load(self, domain: str) -> None:
        """The registry's names from the tree, once per serve."""
        if domain in self._loaded:
            return
        async with self._load_lock:
            if domain in self._loaded:
                return
            found, sizes = await in_thread(self._scan, domain)
            repos = self._domain(domain)
            for digest, names in found.items():
                repos[digest] |= names
            for digest, size in sizes.items():
                self._sizes[(domain, digest)] = size  # our verified copy's
            self._loaded.add(domain)

    def _scan(self, domain: str) -> tuple[dict[str, set[str]], dict[str, int]]:
        found: defaultdict[str, set[str]] = defaultdict(set)
        sizes: dict[str, int] = {}
        for rel, entry in walk_files(self.store.tree.domain_dir(domain)):
            if "/blobs/" not in rel:
                continue  # manifests, and anything else: not a blob name
            try:
                key = key_of(domain, rel)
            except BadRequest:
                continue
            st = lstat(entry) if key.kind is Kind.BLOB else None
            if st is not None:
                found[key.reference].add(key.repository)
                sizes[key.reference] = st.st_size
        return found, sizes

    def _domain(self, domain: str) -> defaultdict[str, set[str]]:
        return self._repos.setdefault(domain, defaultdict(set))

    def holders(self, domain: str, digest: str) -> set[str]:
        repos = self._repos.get(domain)
        return set(repos.get(digest, ())) if repos is not None else set()

    def size(self, domain: str, digest: str) -> int | None:
        return self._sizes.get((domain, digest))

    def add(self, domain: str, name: str, digest: str, size: int | None) -> None:
        self._domain(domain)[digest].add(name)
        if size is not None:
            self._sizes[(domain, digest)] = size

    def forget(self, domain: str, name: str, digest: str) -> None:
        repos = self._repos.get(domain)
        if repos is not None and digest in repos:
            repos[digest].discard(name)

    # --- uploads in progress -------------------------------------------------------

    def began(self, domain: str, name: str) -> None:
        activity = self._activity.setdefault((domain, name), Activity())
        activity.requests += 1
        activity.last = time.monotonic()

    def ended(self, domain: str, name: str) -> None:
        activity = self._activity.get((domain, name))
        if activity is not None:
            activity.requests -= 1
            activity.last = time.monotonic()
            if activity.requests <= 0 and not any(
                    (d, c.name) == (domain, name) for (d, _), c in self._claims.items()):
                del self._activity[(domain, name)]  # nothing waits on it: no table growth

    def claim(self, domain: str, name: str, digest: str) -> None:
        """`name` is about to upload `digest` (its probe found it nowhere).
        Claims abandoned meanwhile go first: a probe whose pusher never
        uploads (a cancelled job) would otherwise stay for good."""
        for (d, g), other in list(self._claims.items()):
            if self._abandoned(d, other):
                self._drop(d, g)
        if (domain, digest) not in self._claims:
            self._claims[(domain, digest)] = Claim(name)
        # Its silence is counted from now.
        self._activity.setdefault((domain, name), Activity()).last = time.monotonic()

    def release(self, domain: str, digest: str) -> None:
        """The claim's final PUT answered: its waiters look again."""
        self._drop(domain, digest)

    def _drop(self, domain: str, digest: str) -> None:
        claim = self._claims.pop((domain, digest), None)
        if claim is not None:
            claim.done.set()
            activity = self._activity.get((domain, claim.name))
            if activity is not None and activity.requests <= 0 and not any(
                    (d, c.name) == (domain, claim.name) for (d, _), c in self._claims.items()):
                # Its repository's other claims still count their silence.
                self._activity.pop((domain, claim.name), None)

    def claim_of(self, domain: str, digest: str) -> Claim | None:
        return self._claims.get((domain, digest))

    async def wait(self, domain: str, name: str, digest: str) -> bool:
        """Wait while another repository's upload of `digest` is alive;
        True if there was one to wait for (look again), False if not."""
        waited = False
        while (claim := self._claims.get((domain, digest))) is not None \
                and claim.name != name:
            if self._abandoned(domain, claim):
                self._claims.pop((domain, digest), None)
                claim.done.set()
                return waited
            if not waited:
                log.info("push probe of %s in %s/%s waits for %s's upload of it", digest, domain,
                         name, claim.name)
            waited = True
            try:
                await asyncio.wait_for(claim.done.wait(), CLAIM_POLL)
            except TimeoutError:
                continue
        return waited

    def _abandoned(self, domain: str, claim: Claim) -> bool:
        activity = self._activity.get((domain, claim.name))
        if activity is None:
            return True
        return activity.requests <= 0 and time.monotonic() - activity.last >= CLAIM_IDLE
