"""The chaos soak's driver (tests/test_e2e_soak.py, `make soak`).

N pulls by 16 concurrent clients through the real `cr-proxy serve`, whose
upstream is the real test registry behind a fault injector
(testbed/chaos.py), while a supervisor SIGKILLs serve every so often and
starts it again on the same cache. A plan drawn from the seed says, for
each pull: the image (a first pull of a fresh image, or one pulled before),
by tag or by digest, mirror mode (path prefix on the mirror's HTTP port) or
https_proxy mode (CONNECT front), and raw HTTP or skopeo.

Every client checks every byte it got against the digest it asked for. A
pull's outcome is its first failure, or ok:

    ok       every manifest and blob complete, each hashing to its digest
    error    a registry error answer: 4xx/5xx with a JSON errors body
    cut      the connection ended early: refused (serve restarting), or a
             body short of its Content-Length (what a miss's client gets
             when the download fails after the head was sent: no digest
             can be checked, a client throws it away)
    wrong    a complete body whose digest is not the one asked for
    unclean  an error answer without a registry's JSON errors body, or a
             status no registry gives there (a 2xx or 3xx where a 200 is due)

skopeo's failures are sorted by its message (it names the registry's error
code, or the broken transfer; "did not match" is its digest check): it does
not show the body, so only the raw clients check that errors are JSON.

`wrong` and `unclean` must be 0. A cut body is also compared with the right
bytes: `cut_wrong` counts those that held a wrong byte before the cut (a
miss streams what it receives and holds back only the last byte until the
digest is checked, so bytes flipped upstream can reach a client whose
response is then cut: never a complete wrong body). Such a byte must be one
the injector flipped (`Chaos.flipped`); any other is `wrong`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from testbed.chaos import Chaos
from testbed.crproxy import CrProxy, clean_env, layout_blobs
from testbed.oci_layout import MT_CONFIG, MT_INDEX, MT_LAYER_TAR, MT_MANIFEST, canonical_json
from testbed.registry import Upstream
from tests.test_e2e_metrics import scrape, value

CLIENTS = 16
HOT_IMAGES = 6  # pulled again and again: cached manifests and blobs
FRESH_SHARE = 0.35  # pulls that are an image's first: uncached manifests and blobs
SKOPEO_SHARE = 0.04  # pulls by skopeo (slow: a few); the rest raw HTTP
PROXY_SHARE = 0.5  # pulls in https_proxy mode; the rest mirror mode
KILL_EVERY = 100  # pulls between SIGKILLs of serve (the first after half of it)
OUTCOMES = ("ok", "error", "cut", "wrong", "unclean")
ACCEPT = ", ".join((MT_MANIFEST, MT_INDEX, "application/vnd.docker.distribution.manifest.v2+json"))
REGISTRY = "registry.test"
DEFAULT_SEED = 18


# --- the images ------------------------------------------------------------------------------


@dataclass
class Image:
    repo: str
    tag: str
    manifest: bytes
    blobs: dict[str, bytes]  # config and layers, by digest

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_image(rng: random.Random, repo: str, base: bytes) -> Image:
    """An OCI image: a base layer every image shares, and one of its own
    (mostly small, a fifth of them 1-6 MiB: room for faults mid-body)."""
    size = rng.randint(1 << 20, 6 << 20) if rng.random() < 0.2 else rng.randint(1 << 10, 256 << 10)
    own = rng.randbytes(size)
    layers = [base, own]
    config = canonical_json({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
    })
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": MT_LAYER_TAR, "digest": digest_of(layer), "size": len(layer)}
                   for layer in layers],
    })
    return Image(repo, "v1", manifest, {digest_of(b): b for b in (config, *layers)})


async def push(session: aiohttp.ClientSession, upstream: Upstream, image: Image) -> None:
    """Straight to the registry (no chaos, no skopeo: hundreds of images in
    seconds), with a token minted for it."""
    token = upstream.issue_token([f"repository:{image.repo}:push,pull"])
    auth = {"Authorization": f"Bearer {token}"}
    base = f"{upstream.registry_url}/v2/{image.repo}"
    for digest, data in image.blobs.items():
        async with session.post(f"{base}/blobs/uploads/", headers=auth) as started:
            assert started.status == 202, await started.text()
            location = started.headers["Location"]
        async with session.put(location, params={"digest": digest}, data=data,
                               headers={**auth, "Content-Type": "application/octet-stream"}) as put:
            assert put.status == 201, await put.text()
    async with session.put(f"{base}/manifests/{image.tag}", data=image.manifest,
                           headers={**auth, "Content-Type": MT_MANIFEST}) as put:
        assert put.status == 201, await put.text()


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pull:
    image: Image
    first: bool  # the image's first pull: its manifest and own layer uncached
    by_digest: bool
    proxy_mode: bool
    skopeo: bool


def plan(rng: random.Random, pulls: int) -> tuple[list[Image], list[Pull]]:
    base = rng.randbytes(32 << 10)
    images: list[Image] = []
    planned: list[Pull] = []
    pulled: list[Image] = []

    def new_image() -> Image:
        image = make_image(rng, f"soak/i{len(images)}", base)
        images.append(image)
        return image

    for _ in range(HOT_IMAGES):
        new_image()
    for _ in range(pulls):
        fresh = rng.random() < FRESH_SHARE or len(pulled) < HOT_IMAGES
        if fresh:
            image = images[len(pulled)] if len(pulled) < HOT_IMAGES else new_image()
            pulled.append(image)
        else:
            image = rng.choice(pulled)
        planned.append(Pull(image, fresh, rng.random() < 0.3, rng.random() < PROXY_SHARE,
                            rng.random() < SKOPEO_SHARE))
    return images, planned


# --- the clients ------------------------------------------------------------------------------


class Failed(Exception):
    def __init__(self, outcome: str, what: str) -> None:
        super().__init__(f"{outcome}: {what}")
        self.outcome = outcome


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    first: Counter[str] = field(default_factory=Counter)  # of first pulls
    by_kind: Counter[str] = field(default_factory=Counter)  # mirror/proxy x raw/skopeo
    requests: int = 0
    cut_wrong: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    def record(self, pull: Pull, outcome: str, what: str) -> None:
        self.outcomes[outcome] += 1
        if pull.first:
            self.first[outcome] += 1
        mode = "proxy" if pull.proxy_mode else "mirror"
        self.by_kind[f"{mode} {'skopeo' if pull.skopeo else 'raw'}"] += 1
        if outcome != "ok":
            self.samples.setdefault(outcome, [])
            if len(self.samples[outcome]) < 5:
                self.samples[outcome].append(what)


class RawClient:
    """Manifest, then config and layers, over HTTP; in https_proxy mode
    through the CONNECT front with the Bearer dance a client does."""

    def __init__(self, cr: CrProxy, tally: Tally, flipped: set[str]) -> None:
        self.cr = cr
        self.tally = tally
        self.flipped = flipped  # Chaos.flipped: digests the injector sent wrong bytes of
        self.tls = ssl.create_default_context(cafile=str(cr.ca_cert))

    async def pull(self, pull: Pull) -> None:
        # A new connection per request (force_close): a kept-alive one
        # would be dead after serve's restart, failing the next request.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, ssl=self.tls),
            auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=120, sock_read=60),
        ) as session:
            if pull.proxy_mode:
                proxy: str | None = f"http://127.0.0.1:{self.cr.proxy_port}"
                base = f"https://{REGISTRY}/v2"
            else:
                proxy, base = None, f"http://{self.cr.http}/v2"
            prefix = f"{base}/{pull.image.repo}" if pull.proxy_mode else (
                f"{base}/{REGISTRY}/{pull.image.repo}")
            headers = await self.login(session, proxy, base, pull.image.repo)
            reference = pull.image.digest if pull.by_digest else pull.image.tag
            await self.fetch(session, proxy, f"{prefix}/manifests/{reference}",
                             {**headers, "Accept": ACCEPT}, pull.image.digest, pull.image.manifest)
            for digest, data in pull.image.blobs.items():
                await self.fetch(session, proxy, f"{prefix}/blobs/{digest}", headers, digest, data)

    async def login(self, session: aiohttp.ClientSession, proxy: str | None, base: str,
                    repo: str) -> dict[str, str]:
        """GET /v2/; on a 401 with a Bearer challenge, a token from its realm."""
        answer = await self.get(session, proxy, f"{base}/", {})
        if answer.status == 200:
            return {}
        challenge = answer.headers.get("WWW-Authenticate", "")
        if answer.status != 401 or not challenge.lower().startswith("bearer "):
            raise self.error(answer, f"{base}/")
        params = dict(part.split("=", 1) for part in challenge[7:].split(","))
        params = {k.strip(): v.strip().strip('"') for k, v in params.items()}
        realm = params.pop("realm")
        query = {"service": params.get("service", ""), "scope": f"repository:{repo}:pull"}
        token = await self.get(session, proxy, realm, {}, query)
        if token.status != 200 or token.cut is not None:
            raise self.error(token, realm)
        try:
            doc = json.loads(token.body)
            value = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError, AttributeError) as exc:
            raise Failed("unclean", f"token answer {token.body[:200]!r}") from exc
        return {"Authorization": f"Bearer {value}"}

    async def fetch(self, session: aiohttp.ClientSession, proxy: str | None, url: str,
                    headers: dict[str, str], digest: str, data: bytes) -> None:
        answer = await self.get(session, proxy, url, headers)
        if answer.status != 200:
            raise self.error(answer, url)
        if answer.cut is not None:
            if answer.body != data[:len(answer.body)]:
                # Bytes the injector flipped, streamed before the digest
                # check refused them: the design. Any other wrong byte (a
                # resume gone astray) is wrong bytes, cut or not.
                if digest not in self.flipped:
                    raise Failed("wrong", f"{url}: a wrong byte no fault flipped, then cut")
                self.tally.cut_wrong += 1
            raise Failed("cut", f"{url}: {len(answer.body)} of {len(data)} bytes: {answer.cut}")
        if digest_of(answer.body) != digest or answer.body != data:
            raise Failed("wrong", f"{url}: {len(answer.body)} bytes hash to "
                         f"{digest_of(answer.body)}")
        sent = answer.headers.get("Docker-Content-Digest")
        if sent is not None and sent != digest:
            raise Failed("wrong", f"{url}: Docker-Content-Digest {sent}")

    @staticmethod
    def error(answer: Answer, url: str) -> Failed:
        """A non-200: clean when a 4xx/5xx carries a registry's JSON errors."""
        what = f"{url}: {answer.status} {answer.body[:200]!r}"
        if answer.cut is not None or answer.status is None:
            return Failed("cut", f"{what} {answer.cut}")
        try:
            errors = json.loads(answer.body).get("errors")
        except (ValueError, AttributeError):
            errors = None
        clean = 400 <= answer.status < 600 and isinstance(errors, list) and errors
        return Failed("error" if clean else "unclean", what)

    async def get(self, session: aiohttp.ClientSession, proxy: str | None, url: str,
                  headers: dict[str, str], params: dict[str, str] | None = None) -> Answer:
        self.tally.requests += 1
        answer = Answer()
        try:
            async with session.get(url, headers=headers, params=params, proxy=proxy) as response:
                answer.status, answer.headers = response.status, dict(response.headers)
                async for chunk in response.content.iter_any():
                    answer.body += chunk
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            answer.cut = repr(exc)
        return answer


@dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut: str | None = None  # why the answer (or its body) ended early


async def skopeo_pull(cr: CrProxy, pull: Pull, dest: Path) -> None:
    """skopeo copy to an OCI layout; every blob it wrote hashed against its
    name. skopeo's own digest check failing is wrong bytes delivered."""
    reference = (f"@{pull.image.digest}" if pull.by_digest else f":{pull.image.tag}")
    args = ["skopeo", "copy", "--preserve-digests", "--retry-times", "0"]
    env = clean_env()
    if pull.proxy_mode:
        certs = dest.with_name(dest.name + "-certs")
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(cr.ca_cert, certs / "ca.crt")
        args += ["--src-cert-dir", str(certs)]
        source = f"{REGISTRY}/{pull.image.repo}{reference}"
        url = f"http://127.0.0.1:{cr.proxy_port}"
        env.update(HTTPS_PROXY=url, HTTP_PROXY=url, NO_PROXY="")
    else:
        args.append("--src-tls-verify=false")
        source = f"{cr.http}/{REGISTRY}/{pull.image.repo}{reference}"
    process = await asyncio.create_subprocess_exec(
        *args, f"docker://{source}", f"oci:{dest}:pulled", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, stderr = await asyncio.wait_for(process.communicate(), 300)
    text = stderr.decode(errors="replace").strip()
    if process.returncode != 0:
        if "did not match" in text.lower():
            raise Failed("wrong", f"skopeo {source}: {text[-300:]}")
        # skopeo names a registry's error code (its JSON errors) or the
        # broken transfer (EOF, reset, refused).
        cut = any(word in text for word in ("EOF", "connection reset", "connection refused",
                                            "broken pipe"))
        raise Failed("cut" if cut else "error", f"skopeo {source}: {text[-300:]}")
    try:
        blobs = layout_blobs(dest)
    except AssertionError as exc:
        raise Failed("wrong", f"skopeo {source}: {exc}") from exc
    if not {pull.image.digest, *pull.image.blobs} <= set(blobs):
        raise Failed("wrong", f"skopeo {source}: missing {set(pull.image.blobs) - set(blobs)}")


# --- the supervisor ------------------------------------------------------------------------


class Supervisor:
    """SIGKILLs serve and starts it again on the same cache; keeps the
    resume counts of each life (the metrics start at 0 with each)."""

    def __init__(self, cr: CrProxy, logs: Path) -> None:
        self.cr = cr
        self.logs = logs  # serve's output, one file per life: serve-<n>.log
        self.kills = 0
        self.resumes: Counter[str] = Counter()
        self.strays: list[str] = []  # temp/ files found right after a restart
        # serve found exited on its own (a crash: its exit status and log),
        # and what went wrong restarting it: the test fails on either.
        self.crashes: list[str] = []
        self.errors: list[str] = []
        self.serving = asyncio.Event()
        self.serving.set()

    def count_resumes(self) -> None:
        samples = scrape(self.cr)
        for how in ("range", "restart", "failed"):
            self.resumes[how] += int(value(samples, "crproxy_blob_resumes_total", how=how))

    def save_log(self) -> Path:
        path = self.logs / f"serve-{self.kills}.log"
        path.write_text(self.cr.log_text())
        return path

    def restart(self) -> None:
        """Blocking: run in a thread. Clients already in flight lose their
        connections; new pulls wait for `serving`."""
        assert self.cr.proc is not None
        crashed = self.cr.proc.poll() is not None
        if crashed:  # it died by itself: no metrics to read, a crash to report
            status = self.cr.stop()
        else:
            self.count_resumes()
            self.cr.kill()
        log = self.save_log()
        if crashed:
            self.crashes.append(f"serve exited by itself (status {status}): {log}")
        self.kills += 1
        self.cr.start()
        # Before any client is let in: what the killed serve left in temp/
        # must be gone (serve empties it at start).
        self.strays += [p.name for p in (self.cr.cache / "temp").iterdir()]


async def run(supervisor: Supervisor, upstream: Upstream, flipped: set[str], pulls: int,
              seed: int, work: Path, log: Callable[[str], None] = print) -> Tally:
    rng = random.Random(seed)
    images, planned = plan(rng, pulls)
    async with aiohttp.ClientSession(trust_env=False) as session:
        semaphore = asyncio.Semaphore(8)

        async def push_one(image: Image) -> None:
            async with semaphore:
                await push(session, upstream, image)

        await asyncio.gather(*(push_one(image) for image in images))
    log(f"soak: seed {seed}, {pulls} pulls of {len(images)} images by {CLIENTS} clients")
    tally = Tally()
    cr = supervisor.cr
    queue = list(enumerate(planned))
    done = 0
    progress = asyncio.Condition()

    async def client() -> None:
        nonlocal done
        raw = RawClient(cr, tally, flipped)
        while queue:
            await supervisor.serving.wait()
            if not queue:
                return
            index, pull = queue.pop(0)
            try:
                if pull.skopeo:
                    await skopeo_pull(cr, pull, work / f"skopeo-{index}")
                else:
                    await raw.pull(pull)
            except Failed as failed:
                tally.record(pull, failed.outcome, str(failed))
            except Exception as exc:  # an answer the client could not take in
                tally.record(pull, "unclean", f"client: {exc!r}")
            else:
                tally.record(pull, "ok", "")
            async with progress:
                done += 1
                progress.notify_all()

    async def supervise() -> None:
        """A SIGKILL every KILL_EVERY pulls done, while the other clients
        are mid-pull; new pulls wait until serve is back."""
        for at in range(KILL_EVERY // 2, pulls - KILL_EVERY // 4, KILL_EVERY):
            async with progress:
                await progress.wait_for(lambda at=at: done >= at)
            supervisor.serving.clear()
            try:
                await asyncio.to_thread(supervisor.restart)
            except Exception as exc:  # reported: the test fails on it
                supervisor.errors.append(repr(exc))
                return  # no more kills; the clients go on to the end
            finally:
                supervisor.serving.set()

    await asyncio.gather(supervise(), *(client() for _ in range(CLIENTS)))
    supervisor.count_resumes()
    return tally


def verify(cr: CrProxy) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cr_proxy", "verify", "--config",
                           str(cr.config_path)], capture_output=True, text=True, timeout=300)


def digest_named_files(cache: Path) -> list[str]:
    """Every file under content/ named by a digest (or stored as the CDN's
    .../sha256/<2>/<hex>/data) whose bytes do not hash to it."""
    bad = []
    for path in (cache / "content").rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith("sha256:"):
            expected = path.name.split(":", 1)[1]
        elif path.name == "data" and path.parent.parent.parent.name == "sha256":
            expected = path.parent.name
        else:
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            bad.append(str(path.relative_to(cache)))
    return bad


def table(tally: Tally, supervisor: Supervisor, chaos: Chaos, seed: int, pulls: int) -> str:
    rows = [f"chaos soak: seed {seed} (SOAK_SEED), {pulls} pulls, {CLIENTS} clients",
            "", "| faults injected | count |", "| --- | --- |"]
    rows += [f"| {kind} | {count} |" for kind, count in chaos.table()]
    rows += [f"| total (of {sum(chaos.requests.values())} upstream requests) | "
             f"{sum(chaos.counts.values())} |", "",
             "| cr-proxy | count |", "| --- | --- |",
             f"| serve SIGKILLed and restarted | {supervisor.kills} |"]
    rows += [f"| resumes ({how}) | {supervisor.resumes[how]} |"
             for how in ("range", "restart", "failed")]
    rows += ["", "| outcome | pulls | of them first pulls |", "| --- | --- | --- |"]
    rows += [f"| {outcome} | {tally.outcomes[outcome]} | {tally.first[outcome]} |"
             for outcome in OUTCOMES]
    rows += [f"| cut, a wrong byte before the cut | {tally.cut_wrong} | |", "",
             "| pulls by | count |", "| --- | --- |"]
    rows += [f"| {kind} | {count} |" for kind, count in sorted(tally.by_kind.items())]
    return "\n".join(rows)


def soak_seed() -> int:
    """SOAK_SEED, or a fixed one: a run is replayed by its seed."""
    return int(os.environ.get("SOAK_SEED") or DEFAULT_SEED)
