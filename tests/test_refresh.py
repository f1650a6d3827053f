"""cr_proxy.ops.refresh, one pass against stubs: one tag's failure is that
tag's, whatever it is (end to end: test_e2e_refresh.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import aiohttp

from cr_proxy.config import load
from cr_proxy.errors import UpstreamError
from cr_proxy.ops.refresh import refresh_once


async def test_a_registry_gone_silent_fails_its_tag_not_the_pass(tmp_path: Path) -> None:
    """A read timeout that escapes revalidation (aiohttp's own) ended the
    pass and the refresh loop with it, for good (a review finding,
    session 13)."""
    errors = [aiohttp.ServerTimeoutError("Timeout on reading data from socket"),
              UpstreamError(message="registry.test answered 503"), None]
    tags = [("registry.test", name, "latest") for name in ("a", "b", "c")]
    asked: list[str] = []

    async def revalidate_tag(_domain: str, name: str, _tag: str) -> bool:
        asked.append(name)
        error = errors.pop(0)
        if error is not None:
            raise error
        return True

    store = SimpleNamespace(tree=SimpleNamespace(pins_file=tmp_path / "pins.json"),
                            cached_tags=lambda: tags)
    fetcher = SimpleNamespace(
        ctx=SimpleNamespace(config=load(environ={}), store=store,
                            upstream=SimpleNamespace(skips=lambda _domain: False)),
        revalidate_tag=revalidate_tag)
    result = await refresh_once(fetcher)  # type: ignore[arg-type]
    assert asked == ["a", "b", "c"]
    assert (result.checked, result.changed, result.failed) == (3, 1, 2)
