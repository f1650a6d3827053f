"""Which registries are down, and when they answer again: one notion of
"down" per registry, shared by every host it sends us to.

- A registry's hosts: its own, its auth realm's (learned from its 401
  challenge), its CDN's and other redirect targets (learned from its
  redirects). A connect failure (refused, timed out, or a name that does
  not resolve) at any of them marks the registry down; while it is down no
  request dials any of its hosts (they fail at once: a stale tag is served,
  a token is a dummy one, an uncached thing is a 404 saying why), so an
  outage costs one connect timeout, not one per host per request.
- A background probe (Probe: `GET /v2/` on a new connection, a short
  timeout) asks each host that failed every `interval` seconds; the
  registry is up again once each has answered (any HTTP answer: it is
  reachable), so no client pays for finding out. A registry nobody asked
  for in IDLE_PROBES probes is no longer probed (dormant): its next request
  dials again, as one would without this memory.
- suspect(): a request that outran its budget (`timeouts.stale_budget`)
  may be stuck on a kept-alive connection into a cut cable, which only a
  read timeout would end: one probe on a new connection tells, in a connect
  timeout; if the registry is down, the requests still waiting for it give
  up then (`went_down`), so nothing waits for `timeouts.read`.
- Quiet: one WARNING when a registry goes down, one when it answers again;
  the rest is counted (metrics: outages, skipped requests, registries down)
  or logged at debug. The tables are bounded (clients name hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cr_proxy.metrics import Metrics

log = logging.getLogger("cr_proxy.upstream")

# (host, scheme) -> None once the host answered anything over HTTP, else the
# connect error (refused, timed out, not resolved).
Probe = Callable[[str, str], Awaitable[BaseException | None]]
Label = Callable[[str], str]  # a registry's metrics label (bounded)

MAX_HOSTS = 1024  # hosts learned as a registry's (auth realm, CDN): oldest dropped
MAX_OUTAGES = 256  # registries remembered down at once: oldest dropped
MAX_SUSPECTS = 64  # one-shot probes of registries that outran a budget, at once
IDLE_PROBES = 12  # probes in a row nobody asked for the registry: then dormant


@dataclass(slots=True)
class Outage:
    """A registry that failed to connect, until each failed host answers."""

    hosts: dict[str, str]  # host that failed -> the scheme it was dialled with
    label: str  # its metrics label when it went down (the gauge goes back down under it)
    task: asyncio.Task[None] | None = None  # the probe loop; None: dormant
    wanted: int = field(default=0)  # requests skipped since the last probe

    @property
    def probing(self) -> bool:
        return self.task is not None


class Health:
    __slots__ = ("_hosts", "_interval", "_label", "_metrics", "_outages", "_own", "_probe",
                 "_suspects", "went_down")

    def __init__(self, interval: float, probe: Probe, metrics: Metrics, label: Label) -> None:
        self._interval = interval
        self._probe = probe
        self._metrics = metrics
        self._label = label
        self._hosts: dict[str, str] = {}  # learned host -> its registry, oldest first
        self._own: dict[str, None] = {}  # hosts that are registries themselves, oldest first
        self._outages: dict[str, Outage] = {}  # registry -> its outage, oldest first
        self._suspects: dict[str, asyncio.Task[None]] = {}
        # Set when any registry goes down (then replaced by a fresh one):
        # requests still waiting for an answer from it give up (client.py).
        self.went_down = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Health down={self.down_registries()} suspect={sorted(self._suspects)}>"

    def down_registries(self) -> list[str]:
        return [r for r, outage in self._outages.items() if outage.probing]

    # --- whose host is it ------------------------------------------------------

    def registry_of(self, host: str) -> str:
        return self._hosts.get(host, host)

    def own(self, host: str) -> None:
        """`host` is a registry in its own right (a request was made for
        it): never another's host. A registry any client may name could
        otherwise redirect to it, then go dark, and take it down with it."""
        self._hosts.pop(host, None)
        self._own.pop(host, None)
        while len(self._own) >= MAX_HOSTS:
            del self._own[next(iter(self._own))]
        self._own[host] = None

    def learn(self, host: str, registry: str) -> None:
        """`host` serves `registry` (its realm, a redirect's target), unless
        it is a registry of its own."""
        if host == registry or host in self._own or self._hosts.get(host) == registry:
            return
        self._hosts.pop(host, None)
        while len(self._hosts) >= MAX_HOSTS:
            del self._hosts[next(iter(self._hosts))]
        self._hosts[host] = registry

    # --- down or up ------------------------------------------------------------

    def is_down(self, host: str) -> bool:
        """Whether host's registry is down (probed in the background)."""
        outage = self._outages.get(self.registry_of(host))
        return outage is not None and outage.probing

    def skip(self, host: str) -> bool:
        """is_down, for a request that will not dial because of it: counted
        (and it keeps the probe going)."""
        registry = self.registry_of(host)
        outage = self._outages.get(registry)
        if outage is None or not outage.probing:
            return False
        outage.wanted += 1
        self._metrics.upstream_skipped.labels(registry=self._label(registry)).inc()
        return True

    def failed(self, host: str, scheme: str, err: BaseException, by: str = "request") -> None:
        """A connect to host failed (by a request, or a probe): its registry
        is down until host answers."""
        registry = self.registry_of(host)
        outage = self._outages.get(registry)
        if outage is None:
            log.warning("upstream %s unreachable (%s: %s); no request dials it until a "
                        "probe, every %gs, finds it answering", registry, host, err,
                        self._interval)
            label = self._label(registry)
            self._metrics.upstream_outages.labels(registry=label).inc()
            self._metrics.upstream_down.labels(registry=label).inc()
            while len(self._outages) >= MAX_OUTAGES:
                oldest = next(iter(self._outages))
                self._end(oldest, self._outages[oldest])
            outage = self._outages[registry] = Outage({}, label)
            self.went_down.set()
            self.went_down = asyncio.Event()
        else:
            log.debug("upstream %s still unreachable (%s: %s; %s)", registry, host, err, by)
        outage.hosts[host] = scheme
        if outage.task is None:
            outage.task = asyncio.get_running_loop().create_task(
                self._probe_loop(registry, outage), name=f"probe {registry}")

    def answered(self, host: str) -> None:
        """host answered a request: once every failed host of its registry
        has, the registry is up."""
        registry = self.registry_of(host)
        outage = self._outages.get(registry)
        if outage is None:
            return
        outage.hosts.pop(host, None)
        if not outage.hosts:
            self._end(registry, outage)
            log.warning("upstream %s reachable again", registry)

    def _end(self, registry: str, outage: Outage) -> None:
        del self._outages[registry]
        self._metrics.upstream_down.labels(registry=outage.label).dec()
        task, outage.task = outage.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _probe_loop(self, registry: str, outage: Outage) -> None:
        idle = 0
        try:
            while outage.hosts and idle < IDLE_PROBES:
                await asyncio.sleep(self._interval)
                idle = 0 if outage.wanted else idle + 1
                outage.wanted = 0
                for host, scheme in list(outage.hosts.items()):
                    err = await self._probe(host, scheme)
                    if err is None:
                        self.answered(host)
                    else:
                        log.debug("upstream %s still unreachable (%s: %s; probe)", registry,
                                  host, err)
            if idle >= IDLE_PROBES:
                log.debug("upstream %s: not asked for; no longer probed, its next request "
                          "dials", registry)
        except Exception:  # a bug here must not leave the registry down for good
            log.exception("probe of %s failed", registry)
        finally:
            if outage.task is asyncio.current_task():
                outage.task = None  # dormant: requests dial again

    def suspect(self, host: str, scheme: str = "https") -> None:
        """A request to host outran its budget: probe it once on a new
        connection; a connect failure marks its registry down."""
        registry = self.registry_of(host)
        if self.is_down(host) or registry in self._suspects or len(
                self._suspects) >= MAX_SUSPECTS:
            return

        async def check() -> None:
            try:
                err = await self._probe(host, scheme)
                if err is not None:
                    self.failed(host, scheme, err, by="probe")
            finally:
                self._suspects.pop(registry, None)

        self._suspects[registry] = asyncio.get_running_loop().create_task(
            check(), name=f"suspect {registry}")

    async def close(self) -> None:
        """Stop every probe (serve's shutdown)."""
        tasks = [o.task for o in self._outages.values() if o.task] + list(self._suspects.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
