"""parent_mirror, upstream_proxy and parent_fallback: what the configuration accepts, and
the URLs a site sends its parent (tests/test_e2e_parent.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from cr_proxy import config
from cr_proxy.cache.layout import mirror_target
from cr_proxy.errors import ConfigError
from cr_proxy.net.policy import Destinations
from cr_proxy.upstream.parent import Parent


def load(**settings: str) -> config.Config:
    return config.load(None, environ={f"CR_PROXY_{k.upper()}": v for k, v in settings.items()})


def test_no_parent_by_default() -> None:
    conf = load()
    assert (conf.parent_mirror, conf.parent_fallback) == ("", "direct")
    assert Parent.of(conf) is None


@pytest.mark.parametrize("url", ["http://parent:5000", "https://parent.example:5443/",
                                 "http://10.0.0.9:5000", "http://[fd00::9]:5000"])
def test_parent_mirror_takes_a_base_url(url: str) -> None:
    parent = Parent.of(load(parent_mirror=url, parent_fallback="fail"))
    assert parent is not None and parent.url == url.rstrip("/")
    assert not parent.direct_fallback


@pytest.mark.parametrize("url", ["parent:5000", "ftp://parent", "http://parent:5000/v2",
                                 "http://parent:5000?x=1", "http://u:p@parent:5000",
                                 "http://parent:99999"])
def test_parent_mirror_refuses_anything_but_scheme_host_port(url: str) -> None:
    with pytest.raises(ConfigError, match="parent_mirror"):
        load(parent_mirror=url)


def test_parent_fallback_is_direct_or_fail() -> None:
    with pytest.raises(ConfigError, match="parent_fallback"):
        load(parent_fallback="retry")


def test_request_url_names_the_registry_as_the_paths_first_component() -> None:
    """As a peer asks its owner. In ?ns= a repository whose first component
    has a dot (team.x/app) was read by the parent as registry team.x; a
    one-label registry gets its default port, or it would be read as a
    Docker Hub repository (a review finding, session 13)."""
    parent = Parent("http://parent:5000", True)
    assert parent.request_url("registry-1.docker.io", "/v2/library/x/manifests/1") == (
        "http://parent:5000/v2/registry-1.docker.io/library/x/manifests/1")
    assert parent.request_url("localhost:5000", "/v2/x/tags/list?n=10") == (
        "http://parent:5000/v2/localhost:5000/x/tags/list?n=10")
    assert parent.request_url("registry.corp", "/v2/team.x/app/manifests/v1") == (
        "http://parent:5000/v2/registry.corp/team.x/app/manifests/v1")
    assert parent.request_url("intranet", "/v2/team/app/manifests/v1") == (
        "http://parent:5000/v2/intranet:443/team/app/manifests/v1")
    assert parent.request_url("intranet", "/v2/") == "http://parent:5000/v2/?ns=intranet"
    for registry, path in (("registry.corp", "/v2/team.x/app/manifests/v1"),
                           ("intranet", "/v2/team/app/manifests/v1")):
        url = parent.request_url(registry, path).removeprefix("http://parent:5000")
        target = mirror_target(url, None, "docker.io", {})
        assert (target.registry, "/v2/" + target.rpath.path.removeprefix("v2/")) == (
            registry, path)


def test_a_parent_by_name_may_resolve_to_a_private_address() -> None:
    # As an endpoint's URL: the operator named it, so its name may resolve
    # to a private address; nobody else's host gains that.
    conf = load(parent_mirror="http://parent.corp:5000")
    destinations = Destinations.of(conf)
    assert destinations.named("parent.corp", 5000)
    assert not destinations.named("parent.corp", 443)
    assert not Destinations.of(load()).named("parent.corp", 5000)


def test_upstream_proxy_takes_an_http_proxy_and_its_ca(tmp_path: Path) -> None:
    ca = tmp_path / "parent-ca.crt"
    ca.write_bytes(trustme.CA().cert_pem.bytes())
    conf = load(upstream_proxy="http://parent:3128", upstream_proxy_ca=str(ca))
    assert (conf.upstream_proxy, conf.upstream_proxy_ca) == ("http://parent:3128", ca)
    parent = Parent.of(conf)
    assert parent is not None and parent.proxy and parent.direct_fallback
    assert parent.request_url("registry.test", "/v2/x/blobs/sha256:1") == (
        "https://registry.test/v2/x/blobs/sha256:1")
    assert Destinations.of(conf).named("parent", 3128)


@pytest.mark.parametrize(("settings", "refusal"), [
    ({"upstream_proxy": "https://parent:3128"}, "an http:// proxy URL"),
    ({"upstream_proxy": "http://parent:3128/x"}, "scheme://host"),
    ({"upstream_proxy": "http://p:3128", "parent_mirror": "http://p:5000"}, "set one of them"),
    ({"upstream_proxy_ca": "/etc/ca.crt"}, "upstream_proxy is not"),
])
def test_upstream_proxy_refusals(settings: dict[str, str], refusal: str) -> None:
    with pytest.raises(ConfigError, match=refusal):
        load(**settings)


def test_an_unreadable_upstream_proxy_ca_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstream_proxy_ca: .* is not a file"):
        load(upstream_proxy="http://parent:3128",
             upstream_proxy_ca=str(tmp_path / "missing.crt"))
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    conf = load(upstream_proxy="http://parent:3128", upstream_proxy_ca=str(garbage))
    with pytest.raises(ConfigError, match="upstream_proxy_ca: cannot load"):
        Parent.of(conf)
