"""fetch/resume.py's check of an answer to a Range request, without a network
(the whole way, with a flaky registry: tests/test_e2e_resume.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from cr_proxy.cache.layout import mirror_target
from cr_proxy.config import Download
from cr_proxy.errors import NotFound, Truncated, UpstreamError
from cr_proxy.fetch.blobs import received_before_the_break
from cr_proxy.fetch.resume import Refused, Resume
from cr_proxy.upstream.client import BODY_READ_BUFFER

DIGEST = "sha256:" + "ab" * 32
TOTAL = 1000


def resume(total: int | None = TOTAL) -> Resume:
    target = mirror_target(f"/v2/flaky.test/lib/app/blobs/{DIGEST}", None, "docker.io", {})
    return Resume(None, target, None, None, total)  # type: ignore[arg-type]


def answer(status: int, content_range: str | None = None, length: int | None = None) -> Any:
    headers = {"Content-Range": content_range} if content_range else {}
    return SimpleNamespace(status=status, headers=headers, content_length=length)


def test_a_206_as_asked_continues_with_nothing_skipped() -> None:
    assert resume()._check(answer(206, "bytes 400-999/1000"), 400) == 0


def test_a_206_teaches_the_total_a_chunked_download_did_not_know() -> None:
    r = resume(None)
    assert r._check(answer(206, "bytes 400-999/1000"), 400) == 0
    assert r.total == 1000


@pytest.mark.parametrize("content_range", [
    "bytes 0-999/1000",      # from the start, not where it was asked
    "bytes 401-999/1000",    # a byte further
    "bytes 400-998/1000",    # short of the end
    "bytes 400-1999/2000",   # another total: another blob
    "bytes 400-999/*",
    "bytes */1000",
    None,
])
def test_a_206_not_as_asked_is_refused(content_range: str | None) -> None:
    with pytest.raises(Refused):
        resume()._check(answer(206, content_range), 400)


def test_a_200_is_read_again_skipping_what_is_written_once_only() -> None:
    r = resume()
    assert r._check(answer(200, length=TOTAL), 400) == 400
    with pytest.raises(Refused, match="twice"):
        r._check(answer(200, length=TOTAL), 700)


def test_a_200_of_another_size_is_refused() -> None:
    with pytest.raises(Refused):
        resume()._check(answer(200, length=TOTAL + 1), 400)


def test_a_404_ends_it_and_other_statuses_are_attempts_that_failed() -> None:
    with pytest.raises(NotFound):
        resume()._check(answer(404), 400)
    with pytest.raises(UpstreamError) as raised:
        resume()._check(answer(503), 400)
    assert not isinstance(raised.value, Refused)


@pytest.mark.parametrize("download", [Download(retries=0), Download(retry_budget=0)],
                         ids=["no-retries", "no-budget"])
def test_spent_bounds_give_the_break_as_the_download_error_without_asking(
    download: Download,
) -> None:
    """No attempt at all (nothing is sent: ctx.upstream would fail) when
    download.retries is 0 or the budget cannot hold the first backoff."""
    released = []
    ctx = SimpleNamespace(config=SimpleNamespace(download=download), upstream=None)
    opened = SimpleNamespace(response=SimpleNamespace(release=lambda: released.append(1)))
    target = mirror_target(f"/v2/flaky.test/lib/app/blobs/{DIGEST}", None, "docker.io", {})
    r = Resume(ctx, target, None, opened, TOTAL)  # type: ignore[arg-type]
    broke = aiohttp.ClientPayloadError("cut")
    with pytest.raises(Truncated, match="cut short") as raised:
        asyncio.run(r.reopen(broke, 400))
    assert raised.value.__cause__ is broke
    assert (r.attempts, released) == (0, [1])


# --- what a broken body had received (fetch/blobs.py) --------------------------------


class _Protocol:
    """What aiohttp's StreamReader asks of its protocol: flow control."""

    def __init__(self) -> None:
        self._reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


async def test_bytes_received_before_a_break_are_handed_over_once() -> None:
    """aiohttp's reads raise a body's error ahead of its buffer; the bytes it
    holds (up to 2 MiB with BODY_READ_BUFFER) are still the download's, and
    the error stays for every later read."""
    body = aiohttp.StreamReader(_Protocol(), BODY_READ_BUFFER,  # type: ignore[arg-type]
                                loop=asyncio.get_running_loop())
    body.feed_data(b"first ")
    assert await body.readany() == b"first "
    body.feed_data(b"held ")
    body.feed_data(b"back")
    cut = aiohttp.ClientPayloadError("cut short")
    body.set_exception(cut)
    with pytest.raises(aiohttp.ClientPayloadError):
        await body.readany()
    assert received_before_the_break(body) == b"held back"
    assert received_before_the_break(body) == b""
    assert body.exception() is cut
    with pytest.raises(aiohttp.ClientPayloadError):
        await body.readany()


async def test_a_body_that_did_not_break_gives_nothing_back() -> None:
    body = aiohttp.StreamReader(_Protocol(), 2**16,  # type: ignore[arg-type]
                                loop=asyncio.get_running_loop())
    body.feed_data(b"unread")
    assert received_before_the_break(body) == b""
    assert await body.readany() == b"unread"
