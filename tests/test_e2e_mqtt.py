"""Edge devices over MQTT, the whole way: a proplet-like device (aiomqtt)
asks a real mosquitto for a module by reference; `cr-proxy serve` resolves
it through its cache from private repositories (the real distribution
upstream, credentials in cr-proxy's `registries:` only) and sends it in
chunks. The modules are OCI artifacts with Wasm media types, a small valid
module and a 5 MiB one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.crproxy import CrProxy
from testbed.mqtt import Answer, Broker, Device
from testbed.oci_layout import MT_WASM_LAYER, build_artifact, wasm_module
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints

BOT, DEVICE = "cr-proxy-bot", "proplet-7"
DOMAIN, CHANNEL = "d0m41n", "ch4nn3l"
CHUNK = 512000  # Propeller's default
BIG = 5 * 1024 * 1024
DEADLINE = 60.0


@dataclass
class Site:
    upstream: Upstream
    broker: Broker
    cr: CrProxy
    small: bytes
    big: bytes
    big_digest: str
    work: Path
    device_password: str

    def device(self, name: str = "dev") -> Device:
        return Device(self.broker, DEVICE, self.device_password, DOMAIN, CHANNEL, name)

    def push(self, name: str, data: bytes) -> str:
        """A Wasm artifact at registry.test/wasm/<name>:v1; its layer digest."""
        info = build_artifact(self.work / name, [(MT_WASM_LAYER, data)], tag="v1")
        self.upstream.push(self.work / name, "v1", f"wasm/{name}", "v1", user="edge")
        return info.layer_digests[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("edge-mqtt")
    registry_secret = "reg-" + os.urandom(8).hex()
    broker_secret, device_secret = "mq-" + os.urandom(8).hex(), "dev-" + os.urandom(8).hex()
    # wasm/small and wasm/big only `edge` may pull; anonymous and `other` may not.
    with Upstream(work / "private", users={"edge": registry_secret, "other": "other-pw"},
                  private={"wasm/small": {"edge"}, "wasm/big": {"edge"}}) as up, Broker(
        work / "broker", {BOT: broker_secret, DEVICE: device_secret}
    ) as broker:
        small, big = wasm_module(), wasm_module(BIG, seed=5)
        site = Site(up, broker, None, small, big, "", work, device_secret)  # type: ignore[arg-type]
        site.push("small", small)
        site.big_digest = site.push("big", big)
        (work / "broker.pw").write_text(broker_secret + "\n")
        with CrProxy(work / "crproxy", proxy_endpoints(up),
                     registries={"registry.test": {"username": "edge",
                                                   "password": registry_secret}},
                     mqtt={"broker": broker.url, "username": BOT,
                           "password_file": str(work / "broker.pw"),
                           "domain_id": DOMAIN, "channel_id": CHANNEL,
                           "chunk_size": CHUNK}) as cr:
            site.cr = cr
            cr.wait_for_output("mqtt: subscribed", DEADLINE)
            yield site
        log = cr.log_text()
        assert broker_secret not in log and registry_secret not in log


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def fetch_both(site: Site, drop: frozenset[int] = frozenset()) -> None:
    async with site.device() as dev:
        small = await dev.fetch("registry.test/wasm/small:v1", DEADLINE)
        big = await dev.fetch("registry.test/wasm/big:v1", DEADLINE, drop=drop)
    assert small.data == site.small and small.total == 1
    assert big.data == site.big and big.total == -(-BIG // CHUNK)
    assert big.checksum == site.big_digest.removeprefix("sha256:")
    if drop:
        assert big.asked_again == [sorted(drop)]


def test_a_device_without_credentials_gets_modules_from_a_private_repository(
    site: Site,
) -> None:
    assert all(site.upstream.refuses("wasm/small", "v1", site.work / f"direct-{who}", who)
               for who in (None, "other"))
    run(fetch_both(site, drop=frozenset({2, 5})))
    assert any(t.user == "edge" and t.status == 200 for t in site.upstream.token_log)


def test_many_devices_at_once_cost_one_upstream_fetch(site: Site) -> None:
    data = wasm_module(BIG, seed=9)
    digest = site.push("wave", data)

    async def wave() -> None:
        devices = [site.device(f"wave-{i}") for i in range(10)]
        for dev in devices:
            await dev.__aenter__()
        try:
            got = await asyncio.gather(*(dev.fetch("registry.test/wasm/wave:v1", DEADLINE)
                                         for dev in devices))
        finally:
            for dev in devices:
                await dev.__aexit__(None, None, None)
        assert all(g.data == data for g in got)

    run(wave())
    assert site.upstream.cdn_blob_gets_settled(digest) == 1


def test_bad_requests_get_error_answers_and_serve_lives_on(site: Site) -> None:
    async def junk() -> None:
        async with site.device() as dev:
            for payload in (b"not json", b"{}", b'{"app_name": null}', b"\xff" * 70000):
                await dev.send(payload)
            for name in ("Registry.test/UPPER::bad", "registry.test/" + "a" * 5000):
                await dev.ask(name)
                assert await dev.error_for(name, DEADLINE)
            await dev.ask("registry.test/wasm/none:v1")
            assert "none" in await dev.error_for("registry.test/wasm/none:v1", DEADLINE)
            await dev.ask("registry.test/wasm/big:v1", [3, 11, 4000])
            assert "out of range" in await dev.error_for("registry.test/wasm/big:v1", DEADLINE)
            await dev.ask("registry.test/wasm/big:v1", list(range(2000)))
            assert "at most" in await dev.error_for("registry.test/wasm/big:v1", DEADLINE)
            got = await dev.fetch("registry.test/wasm/small:v1", DEADLINE)
            assert got.data == site.small

    run(junk())
    assert site.cr.proc is not None and site.cr.proc.poll() is None


def test_modules_are_delivered_from_the_cache_offline(site: Site) -> None:
    up = site.upstream
    with up.stopped():
        run(fetch_both(site, drop=frozenset({0})))

        async def uncached() -> None:
            async with site.device() as dev:
                with pytest.raises(Answer):
                    await dev.fetch("registry.test/wasm/never:v1", DEADLINE)

        run(uncached())


def test_a_request_sent_as_the_broker_comes_back_is_answered(site: Site) -> None:
    site.broker.stop()
    try:
        site.cr.wait_for_output("connecting again", DEADLINE)
    finally:
        site.broker.start()
    # At once, whether or not cr-proxy is back yet: the broker keeps the
    # request for cr-proxy's persistent session.
    run(fetch_both(site))
    assert site.cr.proc is not None and site.cr.proc.poll() is None
