"""A real, Docker-Hub-like upstream registry on loopback, as reusable test infrastructure.

`Upstream(tmp_path)` runs four things on 127.0.0.1, each on a free port chosen once so
that every component can be stopped and restarted *on the same port*:

* **registry** - Debian's `docker-registry` (CNCF distribution 2.8.2) as a subprocess,
  filesystem storage under `storage_root`, token auth, and the `redirect` storage
  middleware so blob GET/HEAD answer `307` to the CDN - the way Docker Hub sends
  clients to its CDN.
* **auth** - a token server (Docker token-auth spec: GET `/token` and the OAuth2
  POST form) in this process, on an event loop in a background thread. It issues
  RS256 JWTs whose `x5c` header carries a certificate from a throw-away CA; the CA's
  PEM is the registry's `rootcertbundle`.
* **cdn** - an nginx subprocess serving the registry's storage directory, so the
  redirect target `/docker/registry/v2/blobs/sha256/<2hex>/<64hex>/data` is the very
  file the registry wrote (Range requests included; access log for counting fetches).
* **name proxy** - a plain HTTP forward proxy (same background loop), used only by
  `push`/`pull_direct`/`skopeo`. See below.

Names, not ports, go into what the registry tells clients: the realm is
`http://auth.test/token` and the redirect base is `http://cdn.test`, exactly as a real
upstream names hosts rather than our loopback ports. Product tests map the three names
(`registry.test`, `auth.test`, `cdn.test`) to `Upstream.endpoints` through the
product's endpoint-override config.

How skopeo reaches `*.test` names without touching /etc/hosts: skopeo (Go) honours
`HTTP_PROXY`/`HTTPS_PROXY` for every host except localhost and loopback IPs, so for
`registry.test`, `auth.test` and `cdn.test` it sends absolute-URI requests
(`GET http://registry.test/v2/ HTTP/1.1`) to the name proxy, which looks the host up
in `endpoints` (a live dict: tests may add names) and streams the request to the
loopback port with the original `Host` header. Keeping `Host: registry.test` matters:
the registry builds absolute upload `Location`s from it, so they point back through
the proxy. With `--*-tls-verify=false` skopeo first pings `https://registry.test/v2/`
via `CONNECT`; the proxy refuses CONNECT, and skopeo falls back to plain HTTP.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict
from yarl import URL

from testbed.lifecycle import Started
from testbed.oci_layout import MT_INDEX, ref_descriptor
from testbed.ports import free_ports, port_open

T = TypeVar("T")

REGISTRY_NAME = "registry.test"
AUTH_NAME = "auth.test"
CDN_NAME = "cdn.test"
ISSUER = "test-token-issuer"
READY_TIMEOUT = 10.0
SKOPEO_TIMEOUT = 300.0

# RFC 7230 hop-by-hop headers: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


# --------------------------------------------------------------------------- helpers


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until `port` accepts connections; fail fast if `proc` died meanwhile."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}:\n{_tail(log)}")
        if port_open(port):
            return
        # A blocking wait on the child doubles as a short back-off between probes.
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)
    raise RuntimeError(f"{proc.args!r} not listening on {port} after {READY_TIMEOUT}s")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (/proc/<pid>/stat: the ppid is
    the 4th field, after the command name in parentheses)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=READY_TIMEOUT)


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class SigningMaterial:
    ca_pem: bytes
    key: rsa.RSAPrivateKey
    cert_der: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@lru_cache(maxsize=1)
def signing_material() -> SigningMaterial:
    """A CA and a token-signing certificate it issued (RSA keygen is slow: made once)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("cr-proxy test token CA"))
        .issuer_name(_name("cr-proxy test token CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ISSUER))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return SigningMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        key=key,
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


def parse_scope(scope: str) -> dict[str, Any]:
    """`repository:library/nginx:pull,push` -> an `access` claim entry.

    The name is everything between the first and the last colon: it may itself hold a
    colon (a `host:port/` prefix), the type and the action list never do.
    """
    rest, _, actions = scope.rpartition(":")
    kind, _, name = rest.partition(":")
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def make_jwt(
    *, service: str, subject: str, scopes: list[str], ttl: int, issuer: str = ISSUER
) -> str:
    """A compact RS256 JWS granting every requested action, with the cert chain in x5c."""
    material = signing_material()
    now = int(time.time())
    header = {
        "typ": "JWT",
        "alg": "RS256",
        # x5c is standard (not URL-safe) base64 of the DER certificate (RFC 7515 4.1.6).
        "x5c": [base64.b64encode(material.cert_der).decode()],
    }
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": service,
        "exp": now + ttl,
        "nbf": now,
        "iat": now,
        "jti": secrets.token_hex(16),
        "access": [parse_scope(s) for s in scopes],
    }
    signing_input = ".".join(
        _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = material.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The (unverified) claims of a token: for tests that inspect what was granted."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


# --------------------------------------------------------------------------- loop thread


class LoopThread:
    """An asyncio event loop in a daemon thread, so aiohttp servers live beside sync tests
    (and beside a test's own event loop, which must never be blocked by them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="upstream-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(READY_TIMEOUT)
        self.loop.close()


class AioServer:
    """One aiohttp app on a fixed loopback port that can be stopped and started again."""

    def __init__(self, loop_thread: LoopThread, app_factory: Any, port: int) -> None:
        self._loop_thread = loop_thread
        self._app_factory = app_factory
        self.port = port
        self._runner: web.BaseRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    def start(self) -> None:
        if self._runner is None:
            self._runner = self._loop_thread.run(self._start())

    def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._loop_thread.run(runner.cleanup())

    async def _start(self) -> web.BaseRunner:
        runner = web.AppRunner(self._app_factory(), shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        # reuse_address: rebinding the same port right after a stop must not hit TIME_WAIT.
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        return runner


# --------------------------------------------------------------------------- token server


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    """(user, password) from an `Authorization: Basic ...` header, else (None, None).

    Decoded by hand: aiohttp.BasicAuth is deprecated in recent aiohttp releases."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None, None
    return (user, password) if sep else (None, None)


@dataclass
class TokenRequest:
    """One request the token server saw, for tests asserting on client behaviour."""

    method: str
    grant_type: str | None
    account: str | None
    user: str | None
    scopes: list[str]
    status: int


@dataclass
class TokenServer:
    """Docker token-auth endpoint. State (counters, refresh tokens) survives restarts.

    Two kinds of login: `credentials`, one user every token request needs
    (a registry whose every repository is private), or `users` with
    `private`, repositories only the users named for each may pull or push
    (Docker Hub's way: anyone may ask, and a token for a scope it may not
    have grants no action, so the registry answers 401 insufficient_scope).
    `revoke` takes a user's access away at once, for the tokens it asks for
    from then on."""

    service: str
    credentials: tuple[str, str] | None = None
    ttl: int = 300
    users: dict[str, str] = field(default_factory=dict)
    private: dict[str, set[str]] = field(default_factory=dict)
    log: list[TokenRequest] = field(default_factory=list)
    _refresh_tokens: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def revoke(self, user: str) -> None:
        """`user` may no longer pull any private repository."""
        with self._lock:
            for allowed in self.private.values():
                allowed.discard(user)

    def _granted(self, subject: str, scope: str) -> str:
        """The scope as granted to `subject`: a private repository's actions
        only for the users allowed it."""
        entry = parse_scope(scope)
        if entry["type"] != "repository" or entry["name"] not in self.private:
            return scope
        with self._lock:
            allowed = subject in self.private[entry["name"]]
        return scope if allowed else f"repository:{entry['name']}:"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.log)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._get)
        app.router.add_post("/token", self._post)
        return app

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _check(self, user: str | None, password: str | None) -> bool:
        if user is not None and user in self.users:
            return self.users[user] == password
        return self.credentials is None or (user, password) == self.credentials

    async def _get(self, request: web.Request) -> web.Response:
        """GET /token?service=&scope=&account=&offline_token= with optional Basic auth."""
        user, password = _basic_credentials(request.headers.get("Authorization", ""))
        # Repeated `scope=` is the norm; a space-joined list is tolerated too.
        scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
        entry = TokenRequest("GET", None, request.query.get("account"), user, scopes, 200)
        if not self._check(user, password):
            entry.status = 401
            self._record(entry)
            return self._unauthorized()
        offline = request.query.get("offline_token", "").lower() == "true"
        self._record(entry)
        return self._grant(request.query.get("service"), user or "", scopes, offline)

    async def _post(self, request: web.Request) -> web.Response:
        """POST /token, OAuth2 form: grant_type=password or grant_type=refresh_token."""
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        scopes = str(form.get("scope", "")).split()  # OAuth2: one space-separated value
        entry = TokenRequest("POST", grant, None, None, scopes, 200)
        if grant == "password":
            entry.user = str(form.get("username", ""))
            if not self._check(entry.user, str(form.get("password", ""))):
                entry.status = 401
        elif grant == "refresh_token":
            with self._lock:
                entry.user = self._refresh_tokens.get(str(form.get("refresh_token", "")))
            if entry.user is None:
                entry.status = 401
        else:
            entry.status = 400
        self._record(entry)
        if entry.status == 400:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if entry.status == 401:
            return self._unauthorized()
        offline = grant == "refresh_token" or form.get("access_type") == "offline"
        refresh = str(form["refresh_token"]) if grant == "refresh_token" else None
        return self._grant(form.get("service"), entry.user or "", scopes, offline, refresh)

    def _unauthorized(self) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            status=401,
            headers={"WWW-Authenticate": f'Basic realm="{AUTH_NAME}"'},
        )

    def _grant(
        self,
        service: object,
        subject: str,
        scopes: list[str],
        offline: bool,
        refresh: str | None = None,
    ) -> web.Response:
        scopes = [self._granted(subject, scope) for scope in scopes]
        token = make_jwt(
            service=str(service or self.service), subject=subject, scopes=scopes, ttl=self.ttl
        )
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.ttl,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
            "scope": " ".join(scopes),
        }
        if offline:
            if refresh is None:
                refresh = secrets.token_urlsafe(24)
                with self._lock:
                    self._refresh_tokens[refresh] = subject
            body["refresh_token"] = refresh
        return web.json_response(body)


# --------------------------------------------------------------------------- name proxy


class NameProxy:
    """Plain-HTTP forward proxy mapping host names to loopback endpoints (for skopeo)."""

    def __init__(self, endpoints: dict[str, str]) -> None:
        self.endpoints = endpoints  # shared, live: names added later are honoured
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_cleanup.append(self._close_session)
        return app

    async def _close_session(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes pass through untouched, digests intact
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=READY_TIMEOUT),
            )
        return self._session

    def _target(self, request: web.Request) -> URL | None:
        # raw_path is the absolute URI exactly as sent: keeps query encoding intact.
        raw = request.raw_path
        if "://" not in raw:
            return None
        rest = raw.split("://", 1)[1]
        path = rest[rest.find("/") :] if "/" in rest else "/"
        base = self.endpoints.get(request.url.host or "")
        return URL(base + path, encoded=True) if base else None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        target = self._target(request)
        if target is None:  # CONNECT (skopeo's https probe) or an unknown name
            return web.Response(status=502, text=f"no route for {request.raw_path}\n")
        # A multidict, not a dict: Go sends one `Accept` line per media type, and the
        # registry refuses OCI manifests to a client whose Accept lacks the OCI types.
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        body = request.content.iter_chunked(1 << 16) if request.body_exists else None
        try:
            async with self._client().request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                return await self._relay(request, upstream)
        except aiohttp.ClientConnectionError as exc:
            return web.Response(status=502, text=f"{target}: {exc}\n")

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _HOP_BY_HOP:
                response.headers.add(key, value)
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
        await response.write_eof()
        return response


# --------------------------------------------------------------------------- upstream


def _registry_config(
    port: int, storage: Path, ca_bundle: Path
) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            # Background purging would race tests that inspect or corrupt storage.
            "maintenance": {"uploadpurging": {"enabled": False}},
            "redirect": {"disable": False},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            # Fixed secret: upload-state HMACs stay valid across a registry restart.
            "secret": "cr-proxy-tests-not-a-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "auth": {
            "token": {
                "realm": f"http://{AUTH_NAME}/token",
                "service": REGISTRY_NAME,
                "issuer": ISSUER,
                "rootcertbundle": str(ca_bundle),
            }
        },
        "middleware": {
            "storage": [{"name": "redirect", "options": {"baseurl": f"http://{CDN_NAME}"}}]
        },
    }


# The CDN's second port: the same files at about 1 Gbit/s per connection, an
# upstream reached over a real link rather than at memory speed (bench).
LINK_RATE = "119m"  # nginx limit_rate, bytes/s: 119 MiB/s ~ 1 Gbit/s
CDN_STATUS = "/_status"  # the CDN's stub_status
CDN_IDLE = re.compile(r"Reading: 0 Writing: 1 ")  # no request but the status one


def _nginx_config(port: int, link_port: int, root: Path, state: Path) -> str:
    # Workers drop to `nobody` when the master is root, and nobody cannot read pytest's
    # 0700 tmp dirs; the `user` directive is only legal (and only needed) as root.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format cdn '$remote_addr "$request" $status $body_bytes_sent "$http_range"';
    access_log {state}/access.log cdn;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name {CDN_NAME};
        root {root};
        location /docker/registry/v2/blobs/ {{ }}
        # Requests in progress, both ports (Upstream.cdn_settled); not logged.
        location = {CDN_STATUS} {{ stub_status; access_log off; }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{link_port};
        server_name {CDN_NAME};
        root {root};
        limit_rate {LINK_RATE};
        location /docker/registry/v2/blobs/ {{ }}
        location / {{ return 404; }}
    }}
}}
"""


class Upstream(Started):
    """registry.test + auth.test + cdn.test on loopback; see the module docstring."""

    registry_name = REGISTRY_NAME
    auth_name = AUTH_NAME
    cdn_name = CDN_NAME
    service = REGISTRY_NAME
    issuer = ISSUER
    realm = f"http://{AUTH_NAME}/token"

    def __init__(
        self,
        workdir: Path,
        *,
        credentials: tuple[str, str] | None = None,
        token_ttl: int = 300,
        users: dict[str, str] | None = None,
        private: dict[str, set[str]] | None = None,
    ) -> None:
        self.dir = Path(workdir) / "upstream"
        self.storage_root = self.dir / "storage"
        self.registry_log = self.dir / "registry.log"
        self.cdn_dir = self.dir / "cdn"
        self.cdn_access_log = self.cdn_dir / "access.log"
        self.credentials = credentials
        (self.registry_port, self.auth_port, self.cdn_port, self.proxy_port,
         self.cdn_link_port) = free_ports(5)
        self.endpoints: dict[str, str] = {
            REGISTRY_NAME: f"http://127.0.0.1:{self.registry_port}",
            AUTH_NAME: f"http://127.0.0.1:{self.auth_port}",
            CDN_NAME: f"http://127.0.0.1:{self.cdn_port}",
        }
        self.token_server = TokenServer(REGISTRY_NAME, credentials, token_ttl,
                                        dict(users or {}), {repo: set(allowed) for repo, allowed
                                                            in (private or {}).items()})
        self._loop: LoopThread | None = None
        self._auth: AioServer | None = None
        self._proxy: AioServer | None = None
        self._registry: subprocess.Popen[bytes] | None = None
        self._cdn: subprocess.Popen[bytes] | None = None

    # ---- URLs and paths

    @property
    def registry_url(self) -> str:
        return self.endpoints[REGISTRY_NAME]

    @property
    def auth_url(self) -> str:
        return self.endpoints[AUTH_NAME]

    @property
    def cdn_url(self) -> str:
        return self.endpoints[CDN_NAME]

    @property
    def token_url(self) -> str:
        """The token endpoint at its loopback address (the realm names auth.test)."""
        return f"{self.auth_url}/token"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def token_requests(self) -> int:
        return self.token_server.request_count

    @property
    def token_log(self) -> list[TokenRequest]:
        return self.token_server.log

    def blob_data_path(self, digest: str) -> Path:
        algorithm, hex_part = digest.split(":", 1)
        return self._blobs_dir() / algorithm / hex_part[:2] / hex_part / "data"

    def cdn_blob_path(self, digest: str) -> str:
        """The URL path the registry redirects a blob GET to (relative to the CDN)."""
        return "/" + str(self.blob_data_path(digest).relative_to(self.storage_root))

    def cdn_blob_gets(self, digest: str) -> int:
        """GETs of this blob the CDN has logged.

        nginx writes the line after sending the last byte, so a client can finish
        reading a moment before it appears: count with cdn_blob_gets_settled
        right after a read.
        """
        pattern = re.compile(rf'"GET {re.escape(self.cdn_blob_path(digest))}[ ?]')
        if not self.cdn_access_log.exists():
            return 0
        return sum(1 for line in self.cdn_access_log.open() if pattern.search(line))

    def registry_requests(self, path: str) -> int:
        """GET and HEAD requests for `path` the registry has received, each
        counted once (by its request id). distribution logs a request as its
        handler starts ("authorized request", or the 401's "error authorizing
        context"), before it answers: a request a client's answer waited for
        is already counted when the answer arrives. (logrus quotes a value
        with characters such as ':', a digest's: "uri" is matched either way.)"""
        uri = re.escape(path)
        pattern = re.compile(r"http\.request\.id=(\S+) http\.request\.method=(?:GET|HEAD) "
                             rf'.*http\.request\.uri=(?:{uri}|"{uri}") ')
        with self.registry_log.open(errors="replace") as log:
            return len({match[1] for line in log if (match := pattern.search(line))})

    def cdn_settled(self, timeout: float = 10.0) -> None:
        """Wait (polled, bounded) until the CDN has no request in progress:
        every GET it has begun is then finished and in its access log. Its
        one worker writes a request's line as it finishes it, in the same
        step that takes it off stub_status's Writing count, so once the
        status request is the only one being written, no earlier request's
        line is still to come: a count taken now cannot miss a second GET
        that was under way or just done when the client finished."""
        deadline = time.monotonic() + timeout
        tick = threading.Event()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            with opener.open(f"{self.cdn_url}{CDN_STATUS}", timeout=timeout) as response:
                status = response.read().decode()
            if CDN_IDLE.search(status):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the CDN still busy after {timeout:.0f}s: {status}")
            tick.wait(0.05)

    def cdn_blob_gets_settled(self, digest: str) -> int:
        """cdn_blob_gets once the CDN has settled: the count to assert on
        right after a client finished ("exactly one GET" must not pass
        because a second one was still being sent or logged)."""
        self.cdn_settled()
        return self.cdn_blob_gets(digest)

    def _blobs_dir(self) -> Path:
        return self.storage_root / "docker" / "registry" / "v2" / "blobs"

    # ---- lifecycle

    def start(self) -> None:
        self._prepare_files()
        self._loop = LoopThread()
        self._auth = AioServer(self._loop, self.token_server.app, self.auth_port)
        self._proxy = AioServer(self._loop, NameProxy(self.endpoints).app, self.proxy_port)
        # A test that dies without stop() must still not leak subprocesses.
        atexit.register(self.stop)
        self.start_auth()
        self._proxy.start()
        self.start_cdn()
        self.start_registry()

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self.stop_registry()
        self.stop_cdn()
        for server in (self._auth, self._proxy):
            if server is not None:
                server.stop()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _prepare_files(self) -> None:
        self.storage_root.mkdir(parents=True, exist_ok=True)
        self.cdn_dir.mkdir(parents=True, exist_ok=True)
        ca_bundle = self.dir / "token-ca.pem"
        ca_bundle.write_bytes(signing_material().ca_pem)
        config = _registry_config(self.registry_port, self.storage_root, ca_bundle)
        # JSON is YAML: no YAML dependency needed to write the registry's config.
        (self.dir / "registry.yml").write_text(json.dumps(config, indent=2))
        (self.cdn_dir / "nginx.conf").write_text(
            _nginx_config(self.cdn_port, self.cdn_link_port, self.storage_root, self.cdn_dir)
        )
        (self.dir / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        (self.dir / "auth.json").write_text("{}")
        (self.dir / "registries.conf").write_text("")
        (self.dir / "registries.d").mkdir(exist_ok=True)

    def start_registry(self) -> None:
        if self._registry is not None and self._registry.poll() is None:
            return
        with self.registry_log.open("ab") as log:
            self._registry = subprocess.Popen(
                ["docker-registry", "serve", str(self.dir / "registry.yml")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(self.registry_port, self._registry, self.registry_log)

    def stop_registry(self) -> None:
        _terminate(self._registry)
        self._registry = None

    def start_cdn(self) -> None:
        if self._cdn is not None and self._cdn.poll() is None:
            return
        error_log = self.cdn_dir / "error.log"
        with error_log.open("ab") as log:
            self._cdn = subprocess.Popen(
                # -e: nginx opens its error log before reading the config; keep it here.
                ["nginx", "-p", str(self.cdn_dir), "-c", str(self.cdn_dir / "nginx.conf"),
                 "-e", str(error_log), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(self.cdn_port, self._cdn, error_log)
        _wait_until_listening(self.cdn_link_port, self._cdn, error_log)

    def stop_cdn(self) -> None:
        _terminate(self._cdn)
        self._cdn = None

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Registry, token server and CDN all stopped for the block (every
        connect refused: the upstream is gone), started again after it."""
        self.stop_registry()
        self.stop_auth()
        self.stop_cdn()
        try:
            yield
        finally:
            self.start_registry()
            self.start_auth()
            self.start_cdn()

    @contextmanager
    def cdn_paused(self) -> Iterator[None]:
        """The CDN's worker stopped (SIGSTOP) for the block: a download under
        way holds still, mid-body, until the block ends (SIGCONT), so a test
        can make two requests meet in flight without relying on timing."""
        assert self._cdn is not None
        workers = [pid for pid in _children(self._cdn.pid)]
        assert workers, "the CDN has no worker"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)

    def start_auth(self) -> None:
        assert self._auth is not None, "start() first"
        self._auth.start()

    def stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()

    # ---- skopeo

    def skopeo_env(self) -> dict[str, str]:
        """Environment that sends skopeo's *.test traffic through the name proxy,
        with no registries.conf, auth file or proxy bypass inherited from the host."""
        env = dict(os.environ)
        for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            env[var] = self.proxy_url
        env.update(
            NO_PROXY="",
            no_proxy="",
            CONTAINERS_REGISTRIES_CONF=str(self.dir / "registries.conf"),
            REGISTRY_AUTH_FILE=str(self.dir / "auth.json"),
        )
        return env

    def skopeo(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `skopeo [global opts] ARGS...`; raise with its output if it fails."""
        cmd = [
            "skopeo",
            "--policy", str(self.dir / "policy.json"),
            "--registries.d", str(self.dir / "registries.d"),
            *args,
        ]
        result = subprocess.run(
            cmd, env=self.skopeo_env(), capture_output=True, text=True,
            timeout=SKOPEO_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def _creds(self, flag: str, user: str | None = None) -> list[str]:
        if user is not None:
            return [flag, f"{user}:{self.token_server.users[user]}"]
        return [flag, ":".join(self.credentials)] if self.credentials else []

    def push(
        self,
        layout_dir: Path,
        ref_name: str,
        repo: str,
        tag: str,
        fmt: Literal["v2s2", "oci"] | None = None,
        user: str | None = None,
    ) -> str:
        """Push `oci:layout_dir:ref_name` to `registry.test/repo:tag`; return its digest.

        Digests are preserved, so the ImageInfo from testbed.oci_layout stays valid;
        fmt="v2s2" converts the manifest (new manifest digest; with uncompressed layers,
        new layer digests too, so build such images with compress=True).
        An image index is pushed whole (`--all`). `user`: as that one of `users`.
        """
        digest_file = self.dir / f"push-{secrets.token_hex(4)}.digest"
        args = ["copy", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
        args += self._creds("--dest-creds", user)
        if fmt == "v2s2":
            args += ["--format", "v2s2"]
        else:
            args.append("--preserve-digests")
        if ref_descriptor(Path(layout_dir), ref_name)["mediaType"] == MT_INDEX:
            args.append("--all")
        self.skopeo(*args, f"oci:{layout_dir}:{ref_name}", f"docker://{REGISTRY_NAME}/{repo}:{tag}")
        digest = digest_file.read_text().strip()
        digest_file.unlink()
        return digest

    def pull_direct(
        self,
        repo: str,
        ref: str,
        dest_dir: Path,
        *,
        all_platforms: bool = False,
        transport: Literal["oci", "dir"] = "oci",
        user: str | None = None,
    ) -> Path:
        """Copy `registry.test/repo:ref` (or `@sha256:...`) straight from the upstream.

        Digests are preserved (skopeo fails rather than convert), so the result can be
        compared byte for byte. `transport="dir"` keeps any manifest type as-is; "oci"
        needs an OCI image. In an oci layout the image is named by the tag (or "pulled").
        `user`: as that one of `users` (else `credentials`, else anonymous).
        """
        src = f"docker://{REGISTRY_NAME}/{repo}" + (f"@{ref}" if ":" in ref else f":{ref}")
        ref_name = "pulled" if ":" in ref else ref
        dest = f"oci:{dest_dir}:{ref_name}" if transport == "oci" else f"dir:{dest_dir}"
        args = ["copy", "--src-tls-verify=false", "--preserve-digests"]
        args += self._creds("--src-creds", user)
        if all_platforms:
            args.append("--all")
        self.skopeo(*args, src, dest)
        return Path(dest_dir)

    def refuses(self, repo: str, ref: str, dest_dir: Path, user: str | None = None) -> bool:
        """Whether the upstream refuses `user` (None: anonymous) a pull of
        `repo:ref` as unauthorized: a private repository's proof."""
        try:
            self.pull_direct(repo, ref, dest_dir, user=user)
        except RuntimeError as error:
            return re.search(r"(?i)unauthorized|denied", str(error)) is not None
        return False

    # ---- misc for tests

    def issue_token(self, scopes: list[str], subject: str = "") -> str:
        """A valid registry token minted directly (no HTTP, not counted)."""
        return make_jwt(
            service=self.service, subject=subject, scopes=scopes, ttl=self.token_server.ttl
        )

    def running(self) -> Iterator[tuple[str, bool]]:
        """(component, is-up) pairs: handy in assertion messages."""
        yield "registry", self._registry is not None and self._registry.poll() is None
        yield "cdn", self._cdn is not None and self._cdn.poll() is None
        yield "auth", self._auth is not None and self._auth.running


def skopeo_available() -> bool:
    return all(shutil.which(tool) for tool in ("skopeo", "docker-registry", "nginx"))
