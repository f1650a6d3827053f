"""`cr-proxy serve`: start the fetcher and nginx together, stop them together.

Order: the CA and the mirror certificate, the rendered nginx configuration
(checked with nginx -t), the fetcher on its unix socket, then nginx as a
supervised child in the foreground. SIGTERM or SIGINT stops both cleanly
(nginx gets SIGQUIT: finish the requests in flight). If nginx dies, serve
stops the fetcher and exits non-zero saying so. nginx is also told to die
with us (PR_SET_PDEATHSIG), so even a SIGKILLed serve leaves no orphan.
Start-up never contacts an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from cr_proxy import nginx, privsep
from cr_proxy.cache.evict import evict_loop
from cr_proxy.cache.layout import LOCK_FILE
from cr_proxy.cache.scrub import scrub_manifest_sidecars
from cr_proxy.cache.store import Store
from cr_proxy.config import Address, Config
from cr_proxy.edge.http import make_app
from cr_proxy.edge.mqtt import MqttEdge
from cr_proxy.edge.resolve import resolve
from cr_proxy.errors import CrProxyError
from cr_proxy.front import certs
from cr_proxy.front.server import Front
from cr_proxy.front.stamp import FrontStamp
from cr_proxy.metrics import Metrics, StatusExtra
from cr_proxy.metrics import make_app as metrics_app
from cr_proxy.ops import logs, usage
from cr_proxy.ops.pin_warm import warm_pins
from cr_proxy.ops.refresh import refresh_loop
from cr_proxy.ops.status import ImageStatus
from cr_proxy.upstream import members

log = logging.getLogger("cr_proxy.serve")

STOP_GRACE = 10.0  # seconds nginx gets to finish in-flight requests
READY_TIMEOUT = 20.0  # seconds nginx gets to open its listen sockets
READY_POLL = 0.05
CACHE_SIZE_INTERVAL = 60.0  # seconds between measurements of the cache size
# Connections nginx may have waiting on the fetcher's socket: a burst of
# misses beyond it got 502s (aiohttp's default is 128). The kernel caps it
# at net.core.somaxconn (4096 on Linux >= 5.4; serve warns when lower).
FETCHER_BACKLOG = 4096
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
# mallopt(3) parameters (glibc's malloc.h) and the values _keep_freed_buffers sets.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_MMAP_THRESHOLD = 4 << 20  # above every body buffer (2 MiB at most)
MALLOC_TRIM_THRESHOLD = 64 << 20
# The PROXY protocol's line for "a connection of the proxy's own, a health
# check" (no addresses): nginx takes it, and it names no client, so it
# needs none of the front's stamp (front/stamp.py), which only a request
# would be checked against; the probe closes before any.
PROXY_HEALTH_CHECK = b"PROXY UNKNOWN\r\n"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # listen hosts meaning "every address"


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on, for the calls Python lacks."""
    return ctypes.CDLL(None, use_errno=True)


def _name_process() -> None:
    """Call this thread, and every thread started after, "cr-proxy" (not
    "python") in top, ps -L and perf; threads inherit the name."""
    _libc().prctl(PR_SET_NAME, b"cr-proxy")


def _keep_freed_buffers() -> None:
    """glibc's malloc: blocks under MMAP_THRESHOLD come from the heap, and
    up to TRIM_THRESHOLD of freed heap is kept for reuse. Its defaults
    (128 KiB, adjusted as blocks come and go) hand the 256 KiB - 2 MiB
    buffers of every download and upload back to the kernel and fault
    fresh, zeroed pages in for the next ones: a 256 MiB miss took 0.04
    CPU-s more and about a tenth longer (docs/performance.md, "Session
    12"). Fixed thresholds keep them. A libc without mallopt keeps its
    own policy."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return
    mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)


def _die_with_parent() -> None:
    """Run in the nginx child before exec: SIGTERM it when serve dies."""
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def reached_at(address: Address) -> str:
    """host:port where clients reach a listener: this machine's name for a
    wildcard address, else the one address it is bound to (a hint naming the
    host name of a loopback-only serve sends clients where nothing listens)."""
    if address.host in WILDCARD_HOSTS:
        return f"{socket.gethostname()}:{address.port}"
    return address.nginx()


def client_hints(config: Config) -> list[str]:
    lines = []
    http, https = config.listen.mirror_http, config.listen.mirror_https
    if http.enabled:
        lines.append(f"mirror (HTTP)  http://{reached_at(http)}")
    if https.enabled:
        lines.append(f"mirror (HTTPS) https://{reached_at(https)}  "
                     f"(trust {config.certs_dir / 'ca.crt'})")
    if config.listen.proxy.enabled:
        proxy = reached_at(config.listen.proxy)
        lines.append(f"https_proxy    http://{proxy}  (CA at http://{proxy}/ca.crt)")
    if http.enabled or https.enabled:
        scheme, mirror = ("http", http) if http.enabled else ("https", https)
        at = reached_at(mirror)
        lines.append(
            f'use it: dockerd "registry-mirrors": ["{scheme}://{at}"]; or skopeo copy '
            f"--src-tls-verify=false docker://{at}/docker.io/library/alpine oci:alpine"
        )
    return lines


async def _listening(config: Config, proc: asyncio.subprocess.Process) -> bool:
    """Wait until nginx accepts on every listen address (it binds them before
    forking workers), so "ready" means ready. False if nginx died first."""
    addresses = [a for a in (config.listen.mirror_http, config.listen.mirror_https) if a.enabled]
    if config.listen.proxy.enabled:
        addresses.append(config.listen.front_tls)
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    pending = list(addresses)
    while pending and proc.returncode is None:
        address = pending[0]
        host = "127.0.0.1" if address.host in ("0.0.0.0", "") else address.host
        host = "::1" if host == "::" else host
        try:
            _, writer = await asyncio.open_connection(host, address.port)
            if address is config.listen.front_tls:
                # That listener reads a PROXY line first: without one nginx
                # logs `[error] broken header` for the probe at every start.
                writer.write(PROXY_HEALTH_CHECK)
                with contextlib.suppress(OSError):
                    await writer.drain()
            writer.close()
            pending.pop(0)
            continue
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise nginx.NginxError(message=f"nginx did not listen on {address}") from None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), READY_POLL)
    return proc.returncode is None


class AlreadyServing(CrProxyError):
    code = "ALREADY_RUNNING"


def _own_the_cache(cache_dir: Path) -> int:
    """Lock the cache for this serve (flock, released when the process
    ends, however it ends), or raise AlreadyServing: a second serve would
    empty the first one's temp/ and held/ and take its sockets and feeds
    before failing to bind. The descriptor is kept open for the process's
    life (not inherited by nginx: Python's are close-on-exec)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyServing(message=f"another cr-proxy serve (pid {holder}) is serving "
                             f"{cache_dir}; stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def serve(config: Config, say: Callable[[str], None] = print) -> int:
    """Run until signalled (exit 0) or until nginx dies (exit 1)."""
    _own_the_cache(config.cache_dir)
    _name_process()
    _keep_freed_buffers()
    config = nginx.with_front_port(config)
    # cluster.peers as a DNS name: the ring's members, followed while serving.
    config, found = members.first(config)
    store = Store(config.cache_dir)
    store.prepare()
    # Before nginx: a hit replays the stored headers unchecked (cache/scrub.py).
    scrub_manifest_sidecars(store.tree)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    ca = certs.ensure_ca(config.certs_dir)
    leaf = certs.ensure_mirror_leaf(ca, config.certs_dir, config.mirror_names)
    # Bounded before nginx sees them: leaves past proxy.max_hosts from an
    # earlier run are dropped here, and render() serves the rest.
    leaves = certs.LeafCache(ca, config.certs_dir, config.proxy.max_hosts)
    leaves.ensure_fallback()
    # Once the directories are there (missing parents made as before, 0755):
    # from now on nothing is for other local users (privsep.py).
    os.umask(privsep.UMASK)
    workers = privsep.pick_workers(config)
    privsep.restrict(config, workers)
    stamp = FrontStamp.new()
    conf = nginx.render(config, leaf.cert, leaf.key, workers=workers, stamp=stamp)
    nginx.check(config, conf)
    metrics = Metrics()

    async with contextlib.AsyncExitStack() as stack:
        stop = _catch_signals(stack)
        # Everything nginx talks to is up before nginx starts.
        feed = usage.UsageFeed(metrics)
        feed.last_used.update(store.load_uses())
        usage_log = config.run_dir / "usage.log"
        usage_log.unlink(missing_ok=True)  # uses of an earlier run are in usage.json
        stack.callback(lambda: store.save_uses(feed.last_used))
        runner = web.AppRunner(make_app(config, metrics), access_log=None, handle_signals=False)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        with contextlib.suppress(FileNotFoundError):
            config.socket_path.unlink()
        await web.UnixSite(runner, str(config.socket_path), backlog=FETCHER_BACKLOG).start()
        _warn_if_backlog_capped()
        # nginx's workers connect to it, maybe as another user (nginx.user).
        privsep.share_socket(config.socket_path, workers)
        ring = Ring(config, found, metrics)
        if config.listen.metrics.enabled:
            await _start_metrics(stack, config, metrics, ring.rows)

        # Left by a crash of an earlier run: nginx would not bind over them.
        for stale in nginx.unix_listeners(config):
            stale.unlink(missing_ok=True)
        # nginx in a process group of its own: if its master dies, its
        # workers would live on, bound to our ports; _reap ends the group.
        proc = await asyncio.create_subprocess_exec(
            *nginx.command(config, conf), preexec_fn=_die_with_parent, start_new_session=True
        )
        stack.push_async_callback(_reap, proc)
        if not await _listening(config, proc):
            say(f"cr-proxy: nginx exited with status {proc.returncode} before listening")
            return 1
        reloader = Reloader(proc)
        if config.listen.proxy.enabled:
            front = Front(config, leaves, stamp)
            servers = HostServers(config, reloader, leaves.remove)
            front.on_host = servers.saw
            leaves.on_drop = servers.drop
            # nginx makes its unix listeners 0666; only the front uses this one.
            os.chmod(front.http_socket, 0o600)
            await front.start()
            stack.push_async_callback(front.close)
        fetcher = runner.app["fetcher"]

        def reopen_logs() -> None:
            proc.send_signal(signal.SIGUSR1)

        tasks = [
            asyncio.create_task(_watch_cache_size(store, metrics, feed)),
            asyncio.create_task(usage.follow(feed, usage.LogTail(usage_log), reopen_logs)),
        ]
        if config.access_log_max_size:
            tasks.append(asyncio.create_task(logs.keep_access_log(
                config.access_log_path, config.access_log_max_size, reopen_logs)))
        if config.refresh.interval > 0:
            tasks.append(asyncio.create_task(refresh_loop(fetcher)))
        if config.cache.pins:
            tasks.append(asyncio.create_task(warm_pins(config)))
        if config.mqtt.enabled:
            # Devices ask by reference; modules come through the fetcher's
            # cached paths (edge/resolve.py), so offline from the cache.
            edge = MqttEdge(config.mqtt, functools.partial(resolve, fetcher))
            tasks.append(asyncio.create_task(edge.run()))
        if found is not None:
            tasks.append(asyncio.create_task(ring.follow(reloader)))
        if config.cache.max_size:
            wake = asyncio.Event()
            fetcher.ctx.fill.on_full = wake.set
            tasks.append(asyncio.create_task(
                evict_loop(config, store, feed.last_used, metrics, wake,
                           fetcher.pushes.pending)))
        for task in tasks:
            task.add_done_callback(_said_if_it_died)
        stack.callback(lambda: [t.cancel() for t in tasks])

        for line in client_hints(config):
            say(line)
        say(f"cr-proxy ready (pid {os.getpid()}, nginx pid {proc.pid})")
        if not await _until_signal_or_exit(proc, stop):
            say(f"cr-proxy: nginx exited with status {proc.returncode}; stopping")
            return 1
        proc.send_signal(signal.SIGQUIT)  # finish the requests in flight
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            proc.kill()
        say("cr-proxy stopped")
        return 0


def _said_if_it_died(task: asyncio.Task[object]) -> None:
    """A background loop (usage feed, refresh, eviction...) that ended on
    an error: said in the log, which nothing else would."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s stopped: %r; serve goes on without it until restarted",
                  task.get_coro().__qualname__, task.exception())


class HostServers:
    """Gives each intercepted host a server of its own in nginx (a static
    leaf: nginx 1.22 reads a leaf chosen by variable from disk at every
    handshake), and takes it away when the host's leaf is dropped
    (proxy.max_hosts). Hosts seen or dropped together share one reload
    (SIGHUP, about 170 ms, in-flight requests unharmed); until it lands, the
    default server picks the same leaf by SNI, so nothing waits for it.

    Reloads are serial, and a dropped host's leaf is deleted only once nginx
    has reloaded without its server: a reload still reading the old servers
    would fail on a missing leaf and keep the old configuration."""

    __slots__ = ("_config", "_done", "_dropped", "_pending", "_reloader", "_remove", "_stale",
                 "_task")

    RELOAD_DELAY = 0.2  # seconds: hosts first seen within it share a reload

    def __init__(
        self, config: Config, reloader: Reloader, remove: Callable[[str], None]
    ) -> None:
        self._config = config
        self._reloader = reloader
        self._remove = remove  # deletes a dropped host's leaf
        self._done = {p.stem for p in (config.run_dir / "hosts").glob("*.conf")}
        self._pending: set[str] = set()
        self._dropped: set[str] = set()
        self._stale = False  # a server was removed since the last reload
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<HostServers {len(self._done)} hosts, {sorted(self._pending)} pending>"

    def saw(self, host: str) -> None:
        if host in self._done or host in self._pending or not nginx.host_server_name(host):
            return
        self._pending.add(host)
        self._reload_later()

    def drop(self, host: str) -> None:
        """The host's leaf was dropped: remove its server, reload, and only
        then let its leaf be deleted."""
        self._pending.discard(host)
        if host in self._done:
            self._done.discard(host)
            nginx.remove_host_server(self._config, host)
            self._stale = True
        self._dropped.add(host)
        self._reload_later()

    def _reload_later(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._reload_soon())

    async def _reload_soon(self) -> None:
        try:
            while self._pending or self._dropped:
                await asyncio.sleep(self.RELOAD_DELAY)
                hosts, self._pending = sorted(self._pending), set()
                dropped, self._dropped = sorted(self._dropped), set()
                for host in hosts:
                    nginx.write_host_server(self._config, host)
                self._done.update(hosts)
                if hosts or self._stale:
                    self._stale = False
                    await self._reloader.reload()
                    if hosts:
                        log.info("nginx reloaded: a server of its own for %s", ", ".join(hosts))
                if dropped:
                    log.info("dropped the leaf and server of %s (least recently used, "
                             "proxy.max_hosts)", ", ".join(dropped))
                for host in dropped:
                    self._remove(host)
        finally:
            self._task = None


class Reloader:
    """nginx's reloads, one at a time (the hosts' servers and the cluster's
    ring both ask for them): SIGHUP, then wait (bounded) until nginx has
    read its configuration: it starts new workers only after."""

    __slots__ = ("_lock", "_proc")

    RELOAD_WAIT = 30.0  # seconds a reload may take to start new workers (4.4 s at 1,000 servers)
    RELOAD_POLL = 0.05

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Reloader nginx {self._proc.pid}>"

    async def reload(self) -> None:
        async with self._lock:
            if self._proc.returncode is not None:
                return
            before = nginx_children(self._proc.pid)
            self._proc.send_signal(signal.SIGHUP)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.RELOAD_WAIT
            while self._proc.returncode is None and loop.time() < deadline:
                if nginx_children(self._proc.pid) - before:
                    return
                await asyncio.sleep(self.RELOAD_POLL)
            log.warning("nginx started no new workers within %.0f s of a reload",
                        self.RELOAD_WAIT)


class Ring:
    """The cluster's members as nginx's ring has them: with cluster.peers a
    DNS name, `follow()` resolves it every cluster.resolve_interval and,
    when its addresses change, renders the ring again and reloads nginx
    (nginx 1.22 resolves an upstream's names only when it loads). A name
    that fails to resolve keeps the ring as it is: a DNS outage must not
    shrink it. `rows()` is the status page's ring: each member's share."""

    __slots__ = ("config", "members", "metrics")

    def __init__(self, config: Config, found: members.Members | None, metrics: Metrics) -> None:
        self.config = config
        self.members = found
        self.metrics = metrics
        metrics.cluster_members.set(len(config.cluster.peers))

    def __repr__(self) -> str:
        return f"<Ring {len(self.config.cluster.peers)} members>"

    async def follow(self, reloader: Reloader) -> None:
        loop = asyncio.get_running_loop()
        cluster = self.config.cluster
        while True:
            await asyncio.sleep(cluster.resolve_interval)
            try:
                found = await loop.run_in_executor(None, members.resolve, cluster)
            except OSError as err:
                log.warning("cluster.peers: %s did not resolve (%s); the ring stays as it is",
                            cluster.service, err)
                continue
            if self.members is not None and found.peers == self.members.peers:
                continue
            before = set(self.config.cluster.peers)
            self.config = members.with_members(self.config, found)
            self.members = found
            await loop.run_in_executor(None, nginx.render_cluster, self.config)
            await reloader.reload()
            self.metrics.cluster_members.set(len(found.peers))
            self.metrics.cluster_changes.inc()
            added, removed = sorted(set(found.peers) - before), sorted(before - set(found.peers))
            log.info("cluster: the ring is now %s (added %s, removed %s)",
                     ", ".join(found.peers), ", ".join(added) or "none",
                     ", ".join(removed) or "none")
            if not found.listed:
                log.warning("cluster: %s does not list this node (%s) yet: the other nodes "
                            "send it no keys", cluster.service, found.me)

    async def rows(self) -> list[tuple[str, str]]:
        """Each member's share of the keys (nginx's ketama, recomputed), when
        no member is skipped."""
        cluster = self.config.cluster
        if not cluster.enabled:
            return []
        return [(f"ring {peer}", f"{share:.1%} of the keys"
                 + (" (this node)" if peer == cluster.me else ""))
                for peer, share in members.shares(cluster.peers).items()]


def nginx_children(pid: int) -> set[int]:
    """The processes nginx's master has started (its workers)."""
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: every process's parent
        children = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.add(int(stat.parent.name))
        return children


def _warn_if_backlog_capped() -> None:
    try:
        cap = int(SOMAXCONN.read_text())
    except (OSError, ValueError):
        return
    if cap < FETCHER_BACKLOG:
        log.warning("net.core.somaxconn is %d: more misses than that at once may get 502s "
                    "from nginx; raise it to %d (sysctl)", cap, FETCHER_BACKLOG)


def _catch_signals(stack: contextlib.ExitStack | contextlib.AsyncExitStack) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event, from now until the stack closes."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
        stack.callback(loop.remove_signal_handler, sig)
    return stop


async def _until_signal_or_exit(proc: asyncio.subprocess.Process, stop: asyncio.Event) -> bool:
    """True when a stop signal came, False when nginx exited first."""
    nginx_exit = asyncio.ensure_future(proc.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({nginx_exit, stopped}, return_when=asyncio.FIRST_COMPLETED)
        return stopped.done()
    finally:
        stopped.cancel()
        nginx_exit.cancel()


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """nginx and every worker it left: nothing of it outlives serve."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _start_metrics(
    stack: contextlib.AsyncExitStack, config: Config, metrics: Metrics,
    ring: StatusExtra,
) -> None:
    status = ImageStatus(config)

    async def rows() -> list[tuple[str, str]]:
        return [*await ring(), *await status.rows()]

    runner = web.AppRunner(metrics_app(metrics, rows), access_log=None,
                           handle_signals=False)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    address = config.listen.metrics
    await web.TCPSite(runner, address.host, address.port).start()


async def _watch_cache_size(store: Store, metrics: Metrics, feed: usage.UsageFeed) -> None:
    """Keep the cache-size gauge current (one stat per stored blob), and save
    the last-use times so a restart keeps the LRU order."""
    loop = asyncio.get_running_loop()
    while True:
        metrics.cache_bytes.set(await loop.run_in_executor(None, store.blob_bytes))
        await loop.run_in_executor(None, store.save_uses, dict(feed.last_used))
        await asyncio.sleep(CACHE_SIZE_INTERVAL)
