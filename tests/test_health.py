"""cr_proxy.upstream.health: one notion of "down" per registry, shared by
its hosts, probed in the background until each failed host answers. The
probe here is a fake the test scripts; the interval is short and every wait
is on an event the fake sets (bounded), never on the clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from cr_proxy.metrics import Metrics
from cr_proxy.upstream import health as health_mod
from cr_proxy.upstream.health import MAX_HOSTS, MAX_OUTAGES, Health

WAIT = 10.0  # seconds: a bound on waits for the fake probe, never reached when all is well
REFUSED = ConnectionRefusedError("refused")


class FakeProbe:
    """Answers each (host, scheme) as told: an error (unreachable) until
    `answer(host)`; records every call and wakes whoever waits for one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.up: set[str] = set()
        self._called = asyncio.Condition()

    def answer(self, host: str) -> None:
        self.up.add(host)

    async def __call__(self, host: str, scheme: str) -> BaseException | None:
        async with self._called:
            self.calls.append((host, scheme))
            self._called.notify_all()
        return None if host in self.up else REFUSED

    async def wait_calls(self, count: int) -> None:
        async with self._called:
            await asyncio.wait_for(self._called.wait_for(lambda: len(self.calls) >= count), WAIT)


def sample(metrics: Metrics, name: str, registry: str) -> float:
    value = metrics.registry.get_sample_value(name, {"registry": registry})
    return value or 0.0


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def probe() -> FakeProbe:
    return FakeProbe()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def health(probe: FakeProbe, metrics: Metrics) -> Iterator[Health]:
    health = Health(0.01, probe, metrics, lambda registry: registry)
    yield health
    await health.close()


async def until(condition, what: str) -> None:
    """Poll an in-process condition, bounded (the probe loop runs on this loop)."""
    for _ in range(int(WAIT / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def test_a_failed_cdn_takes_its_registry_and_auth_realm_down_with_one_warning(
    health: Health, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "cr_proxy.upstream")
    health.learn("auth.test", "registry.test")
    health.learn("cdn.test", "registry.test")
    health.failed("cdn.test", "http", REFUSED)
    for host in ("registry.test", "auth.test", "cdn.test"):
        assert health.is_down(host), host
    assert not health.is_down("other.test")
    # More failures of its hosts while it is down: no second warning.
    health.failed("registry.test", "https", TimeoutError("connect"))
    health.failed("auth.test", "http", OSError("name does not resolve"))
    assert [w.split(";")[0] for w in warnings(caplog)] == [
        "upstream registry.test unreachable (cdn.test: refused)"]
    assert sample(metrics, "crproxy_upstream_outages_total", "registry.test") == 1
    assert sample(metrics, "crproxy_upstream_down", "registry.test") == 1


async def test_requests_skipped_while_down_are_counted_and_keep_the_probe_going(
    health: Health, metrics: Metrics
) -> None:
    health.learn("auth.test", "registry.test")
    assert not health.skip("registry.test")  # up: nothing to skip, nothing counted
    health.failed("registry.test", "https", REFUSED)
    assert all(health.skip(host) for host in ("registry.test", "auth.test", "registry.test"))
    assert sample(metrics, "crproxy_upstream_skipped_total", "registry.test") == 3
    assert not health.skip("other.test")


async def test_the_probe_brings_a_registry_up_once_every_failed_host_answers(
    health: Health, probe: FakeProbe, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    health.learn("cdn.test", "registry.test")
    health.failed("registry.test", "https", REFUSED)
    health.failed("cdn.test", "http", REFUSED)
    await probe.wait_calls(4)  # two rounds, both hosts each, with the scheme they failed on
    assert set(probe.calls) == {("registry.test", "https"), ("cdn.test", "http")}
    probe.answer("registry.test")
    calls = len(probe.calls)
    await probe.wait_calls(calls + 2)
    assert health.is_down("registry.test"), "the CDN has not answered yet"
    probe.answer("cdn.test")
    await until(lambda: not health.is_down("cdn.test"), "the registry came up")
    assert not health.is_down("registry.test")
    assert [w for w in warnings(caplog) if "reachable again" in w] == [
        "upstream registry.test reachable again"]
    assert sample(metrics, "crproxy_upstream_down", "registry.test") == 0
    # Up: no more probes.
    calls = len(probe.calls)
    health.failed("elsewhere.test", "https", REFUSED)  # something to wait for instead
    await probe.wait_calls(calls + 2)
    assert {host for host, _ in probe.calls[calls:]} == {"elsewhere.test"}


async def test_a_request_that_gets_an_answer_while_down_brings_the_registry_up(
    health: Health, caplog: pytest.LogCaptureFixture
) -> None:
    health.failed("registry.test", "https", REFUSED)
    health.answered("registry.test")
    assert not health.is_down("registry.test")
    assert sum("reachable again" in w for w in warnings(caplog)) == 1
    health.answered("registry.test")  # up already: nothing more said
    assert sum("reachable again" in w for w in warnings(caplog)) == 1


async def test_a_registry_nobody_asks_for_goes_dormant_and_its_next_failure_is_not_warned_again(
    health: Health, probe: FakeProbe, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(health_mod, "IDLE_PROBES", 3)
    health.failed("registry.test", "https", REFUSED)
    await until(lambda: not health.is_down("registry.test"), "dormant after 3 idle probes")
    assert len(probe.calls) == 3
    # Dormant: its next request dials; failing again, it is down again, quietly.
    health.failed("registry.test", "https", REFUSED)
    assert health.is_down("registry.test")
    assert sum("unreachable" in w for w in warnings(caplog)) == 1
    # ...and asked for, it stays probed.
    for _ in range(5):
        calls = len(probe.calls)
        assert health.skip("registry.test")
        await probe.wait_calls(calls + 1)
    assert health.is_down("registry.test")


async def test_a_suspect_is_probed_once_and_marked_down_only_if_it_does_not_answer(
    health: Health, probe: FakeProbe, caplog: pytest.LogCaptureFixture
) -> None:
    probe.answer("slow.test")
    health.suspect("slow.test")
    health.suspect("slow.test")  # one probe in flight per registry
    await probe.wait_calls(1)
    await until(lambda: not health._suspects, "the suspect probe ended")
    assert probe.calls == [("slow.test", "https")]
    assert not health.is_down("slow.test")
    health.suspect("cut.test")
    await until(lambda: health.is_down("cut.test"), "cut.test marked down by its probe")
    assert sum("upstream cut.test unreachable" in w for w in warnings(caplog)) == 1


async def test_the_tables_are_bounded(health: Health, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(MAX_HOSTS + 10):
        health.learn(f"h{i}.test", "registry.test")
    assert len(health._hosts) == MAX_HOSTS
    assert health.registry_of(f"h{MAX_HOSTS + 9}.test") == "registry.test"
    assert health.registry_of("h0.test") == "h0.test"  # the oldest went
    for i in range(MAX_OUTAGES + 10):
        health.failed(f"r{i}.test", "https", REFUSED)
    assert len(health._outages) == MAX_OUTAGES
    assert health.is_down(f"r{MAX_OUTAGES + 9}.test")
    assert not health.is_down("r0.test")


async def test_close_stops_every_probe(health: Health, probe: FakeProbe) -> None:
    health.failed("registry.test", "https", REFUSED)
    health.suspect("other.test")
    await probe.wait_calls(2)
    await health.close()
    tasks = [o.task for o in health._outages.values()] + list(health._suspects.values())
    assert all(task is None or task.done() for task in tasks)


async def test_the_down_gauge_goes_back_under_the_label_it_went_up_with(
    probe: FakeProbe, metrics: Metrics
) -> None:
    """A registry first counted as "other" that answers meanwhile gets its
    own label (upstream.registry_label): its gauge must not end at -1 there
    and +1 under "other"."""
    known: set[str] = set()
    health = Health(60, probe, metrics, lambda r: r if r in known else "other")
    try:
        health.failed("new.test", "https", REFUSED)
        known.add("new.test")
        health.answered("new.test")
        assert sample(metrics, "crproxy_upstream_down", "other") == 0
        assert sample(metrics, "crproxy_upstream_down", "new.test") == 0
    finally:
        await health.close()
