"""Destination policy and port rules, end to end through `cr-proxy serve`
(issue 10, findings 3, 4 and 12).

A destination is a host AND a port. Each test points hostile requests at a
`Canary` (tests/faulty.py), a loopback listener that must never see a
connection, and checks the refusal is a clear 403:

- the CONNECT tunnel (hosts not intercepted, so tunnelled blind) refuses
  every spelling of loopback and names that resolve to it, and connects to
  the address it checked; a host:port the operator allowed still tunnels;
- a host named in `endpoints` (or by an endpoint URL) is open only at the
  port named, through the mirror, CONNECT and plain-HTTP forwarding;
  `allow_private: [localhost:<port>]` opens that port and no other;
- the fetcher enforces the https_proxy port rule itself: an SNI and Host
  naming another port than the one CONNECTed to, a Host header differing
  from the request line, a pipelined second request.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from testbed.crproxy import CrProxy
from testbed.ports import free_ports
from tests.faulty import (
    Answer,
    Canary,
    FakeImage,
    FaultyRegistry,
    connect_tunnel,
    http,
    raw_exchange,
    sha256,
    split_response,
)

FAKE = FaultyRegistry.name
# Every spelling of 127.0.0.1 a resolver accepts, and names that resolve to it.
LOOPBACK_SPELLINGS = ("127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7F.0.0.1",
                      "localhost", "localhost.", socket.gethostname().lower())


def connect_only(proxy_port: int, target: str) -> tuple[socket.socket, bytes]:
    """CONNECT through the front: (the socket, the front's answer head)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
        answer += chunk
    return sock, answer


def front_exchange(cr: CrProxy, data: bytes) -> bytes:
    """Raw bytes to the front (plain-HTTP proxy requests), all it answers."""
    with socket.create_connection(("127.0.0.1", cr.proxy_port), timeout=30) as sock:
        return raw_exchange(sock, data)


def mirror_get(cr: CrProxy, path: str) -> Answer:
    return http(f"http://{cr.http}{path}")


def assert_denied(answer: Answer, what: object) -> None:
    """A 403 DENIED in registry JSON: the fetcher's policy refused it."""
    assert answer.status == 403, (what, answer)
    assert answer.json_errors()[0]["code"] == "DENIED", (what, answer)


def statuses(raw: bytes) -> list[int]:
    """The status of every response in a raw (pipelined) exchange: the next
    one starts right after the last byte of the body before it."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


# --- finding 3: the CONNECT tunnel never reaches loopback -----------------------------------


@dataclass
class Narrow:
    cr: CrProxy
    canary: Canary  # on a port in proxy.ports, allowed for no host
    allowed: Canary  # localhost:<its port> is in proxy.allow_private
    local: FaultyRegistry  # localhost:<its port> is in proxy.allow_private
    image: FakeImage


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Narrow]:
    """`proxy.intercept` narrowed to faulty.test: every other host is tunnelled."""
    (proxy_port,) = free_ports(1)
    with FaultyRegistry() as fake, FaultyRegistry() as local, Canary() as canary, \
            Canary() as allowed:
        image = local.add_image("app", "v1", [b"a layer only this registry has"])
        proxy = {"intercept": [FAKE], "ports": [443, canary.port, allowed.port],
                 "allow_private": [f"localhost:{allowed.port}", f"localhost:{local.port}"]}
        with CrProxy(tmp_path_factory.mktemp("narrow"), fake.endpoints,
                     listen_proxy=f"127.0.0.1:{proxy_port}", proxy=proxy) as cr:
            yield Narrow(cr, canary, allowed, local, image)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_connect_tunnel_never_reaches_loopback(narrow: Narrow, host: str) -> None:
    """Finding 3: each spelling is refused by the literal or by what the
    name resolves to (the machine's own name too), with a 403."""
    sock, answer = connect_only(narrow.cr.proxy_port, f"{host}:{narrow.canary.port}")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 403"), (host, answer)
    assert narrow.canary.connections == 0, narrow.canary.seen


def test_a_host_port_the_operator_allowed_still_tunnels(narrow: Narrow) -> None:
    sock, answer = connect_only(narrow.cr.proxy_port, f"localhost:{narrow.allowed.port}")
    with sock:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        reply = raw_exchange(sock, b"GET / HTTP/1.0\r\n\r\n")
    assert narrow.allowed.body in reply
    assert narrow.allowed.connections == 1
    assert narrow.canary.connections == 0


def test_allow_private_host_port_opens_that_port_and_no_other(narrow: Narrow) -> None:
    """Finding 4: `allow_private: [localhost:<port>]` (the README's form)
    makes a pull from that registry work through the mirror; the same host
    at another port stays refused."""
    name = f"localhost:{narrow.local.port}/app"
    manifest = mirror_get(narrow.cr, f"/v2/{name}/manifests/v1")
    assert manifest.status == 200, manifest
    assert manifest.body == narrow.image.manifest
    for digest, data in narrow.image.blobs.items():
        blob = mirror_get(narrow.cr, f"/v2/{name}/blobs/{digest}")
        assert blob.status == 200, (digest, blob)
        assert sha256(blob.body) == digest and blob.body == data
    for path in (f"/v2/localhost:{narrow.canary.port}/app/manifests/v1",
                 f"/v2/app/manifests/v1?ns=localhost:{narrow.canary.port}",
                 "/v2/localhost/app/manifests/v1"):
        assert_denied(mirror_get(narrow.cr, path), path)
    assert narrow.canary.connections == 0, narrow.canary.seen


# --- finding 4: an endpoint's host is open only at the port named --------------------------


@dataclass
class Endpoints:
    cr: CrProxy
    canary: Canary  # the "metrics page": another port of the endpoints' hosts
    fake: FaultyRegistry
    image: FakeImage


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """registry.test -> the fake by address, named.test -> the fake by the
    name localhost; the canary's port is in proxy.ports."""
    (proxy_port,) = free_ports(1)
    with FaultyRegistry() as fake, Canary() as canary:
        image = fake.add_image("app", "v1", [b"layer"])
        hosts = {**fake.endpoints, "registry.test": fake.url,
                 "named.test": f"http://localhost:{fake.port}"}
        with CrProxy(tmp_path_factory.mktemp("endpoints"), hosts,
                     listen_proxy=f"127.0.0.1:{proxy_port}",
                     proxy={"ports": [443, canary.port]}) as cr:
            yield Endpoints(cr, canary, fake, image)


def test_endpoint_hosts_are_served_at_the_port_named(endpoints: Endpoints) -> None:
    for registry in ("registry.test", "named.test"):
        answer = mirror_get(endpoints.cr, f"/v2/{registry}/app/manifests/v1")
        assert answer.status == 200, (registry, answer)
        assert answer.body == endpoints.image.manifest


def test_mirror_never_reaches_another_port_of_an_endpoint_host(endpoints: Endpoints) -> None:
    port = endpoints.canary.port
    paths = [f"/v2/{host}:{port}/app/manifests/v1"
             for host in ("registry.test", "named.test", "localhost", "127.0.0.1")]
    paths += [f"/v2/app/manifests/v1?ns={host}:{port}" for host in ("registry.test", "localhost")]
    paths += [f"/v2/localhost:{port}/app/blobs/{endpoints.image.config_digest}"]
    for path in paths:
        answer = mirror_get(endpoints.cr, path)
        assert_denied(answer, path)
        assert endpoints.canary.body not in answer.body
    assert endpoints.canary.connections == 0, endpoints.canary.seen


def test_https_proxy_never_reaches_another_port_of_an_endpoint_host(
    endpoints: Endpoints,
) -> None:
    """CONNECT and plain-HTTP forwarding (a POST with a body too)."""
    cr, port = endpoints.cr, endpoints.canary.port
    for host in ("registry.test", "named.test", "localhost", "127.0.0.1"):
        sock, answer = connect_only(cr.proxy_port, f"{host}:{port}")
        sock.close()
        assert answer.startswith(b"HTTP/1.1 403"), (host, answer)
    for host in ("registry.test", "localhost", "127.0.0.1"):
        for method, body in (("GET", b""), ("POST", b"x=1")):
            raw = front_exchange(cr, (
                f"{method} http://{host}:{port}/anything HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
            assert raw.startswith(b"HTTP/1.1 403"), (method, host, raw[:300])
            assert endpoints.canary.body not in raw
    assert endpoints.canary.connections == 0, endpoints.canary.seen


# --- finding 12: the fetcher enforces the port rule ------------------------------------------


@dataclass
class Ports:
    cr: CrProxy
    tls_canary: Canary  # localhost:<its port> IS allowed: only the port rule stops it
    http_canary: Canary  # localhost:<its port> is not


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    (proxy_port,) = free_ports(1)
    with FaultyRegistry() as fake, Canary() as tls_canary, Canary() as http_canary:
        fake.add_image("app", "v1", [b"layer"])
        proxy = {"allow_private": ["localhost", f"localhost:{tls_canary.port}"]}
        with CrProxy(tmp_path_factory.mktemp("ports"), fake.endpoints,
                     listen_proxy=f"127.0.0.1:{proxy_port}", proxy=proxy) as cr:
            yield Ports(cr, tls_canary, http_canary)


def tls_request(cr: CrProxy, connect: str, sni: str, host: str) -> Answer:
    """CONNECT `connect`, TLS with `sni` (not verified), one GET /v2/ with `host`."""
    cafile = str(cr.ca_cert) if sni == FAKE else None
    sock, answer = connect_tunnel(cr.proxy_port, connect, sni=sni, cafile=cafile)
    with sock:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        raw = raw_exchange(sock, f"GET /v2/ HTTP/1.1\r\nHost: {host}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    return Answer(*split_response(raw))


def test_sni_and_host_naming_another_port_do_not_move_the_dial(ports: Ports) -> None:
    """CONNECT localhost:443, then SNI and Host `localhost:<port>`: the
    fetcher dials only the port connected to, though localhost:<port> is
    an allowed destination."""
    target = f"localhost:{ports.tls_canary.port}"
    answer = tls_request(ports.cr, "localhost:443", sni=target, host=target)
    assert_denied(answer, target)
    assert "port" in answer.json_errors()[0]["message"]
    assert ports.tls_canary.connections == 0, ports.tls_canary.seen
    # The port connected to is the port dialled: faulty.test:443 still works.
    assert tls_request(ports.cr, f"{FAKE}:443", sni=FAKE, host=FAKE).status == 200


def test_plain_http_host_header_cannot_name_another_port(ports: Ports) -> None:
    """The front checks the request line (faulty.test, port 80); the Host
    names localhost:<port>, which the fetcher must check the same way."""
    target = f"localhost:{ports.http_canary.port}"
    raw = front_exchange(ports.cr, f"GET http://{FAKE}/v2/ HTTP/1.1\r\nHost: {target}\r\n"
                                   "Connection: close\r\n\r\n".encode())
    answer = Answer(*split_response(raw))
    assert_denied(answer, target)
    assert "port" in json.loads(answer.body)["errors"][0]["message"]
    assert ports.http_canary.connections == 0, ports.http_canary.seen


def test_a_pipelined_request_is_checked_too(ports: Ports) -> None:
    """The front decides on the first head only; the second, pipelined in
    the same write, names a port the front would have refused."""
    target = f"localhost:{ports.http_canary.port}"
    raw = front_exchange(ports.cr, (
        f"GET http://{FAKE}/v2/ HTTP/1.1\r\nHost: {FAKE}\r\n\r\n"
        f"GET http://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    ).encode())
    assert statuses(raw) == [200, 403], raw[:600]
    assert b'"DENIED"' in raw
    assert ports.http_canary.connections == 0, ports.http_canary.seen


def test_the_connected_port_header_cannot_come_from_a_client(ports: Ports) -> None:
    """X-CR-Port is nginx's (the front's PROXY line), never the client's."""
    target = f"localhost:{ports.tls_canary.port}"
    sock, answer = connect_tunnel(ports.cr.proxy_port, "localhost:443", sni=target)
    with sock:
        assert answer.startswith(b"HTTP/1.1 200"), answer
        raw = raw_exchange(sock, f"GET /v2/ HTTP/1.1\r\nHost: {target}\r\n"
                                 f"X-CR-Port: {ports.tls_canary.port}\r\n"
                                 "Connection: close\r\n\r\n".encode())
    assert_denied(Answer(*split_response(raw)), target)
    assert ports.tls_canary.connections == 0, ports.tls_canary.seen
