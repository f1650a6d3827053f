"""Resume: a blob download whose upstream connection broke, asked again
from the byte it got to.

A break is a reset, a close short of the Content-Length, silence past
timeouts.read or a trickle under limits.min_rate (BREAKS). The download
(blobs.py) keeps its temp file, its hash and its readers; Resume.reopen
gives it a new upstream body that continues where the file ends:

- `Range: bytes=<written>-` to the URL that served the bytes (the CDN's,
  after a redirect); a signed URL that expired meanwhile (any answer but
  206 or 200) is asked of the registry again, whose new redirect is
  followed with the same Range;
- a 206 must say `Content-Range: bytes <written>-<total-1>/<total>`, the
  total the download started with: anything else is another blob, refused;
- a 200 (an upstream ignoring Range) is the whole blob again: its first
  <written> bytes are skipped, not written, so the file and the hash stay
  exactly what the readers were sent. Once per download: an upstream that
  does it twice costs a blob's worth each time, so the download fails;
- at most download.retries attempts, 0.1 s doubling between them, none
  starting after download.retry_budget seconds from the first break, and
  none while the registry is down (upstream/health.py): then the last
  break is the download's error.

The final digest check (store.BlobWriter.verify) still decides: bytes that
are wrong after a resume fail the download like any other wrong bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import aiohttp

from cr_proxy.cache.layout import Target
from cr_proxy.errors import (
    CrProxyError,
    DestinationRefused,
    NotFound,
    Truncated,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from cr_proxy.fetch.context import FetchContext
from cr_proxy.upstream.client import Opened, upstream_url

log = logging.getLogger("cr_proxy.fetcher")

# What breaks a body mid-way (aiohttp's payload errors: a reset, a close
# short of Content-Length; its read timeout; RateGuard's cut).
BREAKS: tuple[type[BaseException], ...] = (
    aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, UpstreamTimeout,
    ConnectionError,
)
FIRST_BACKOFF = 0.1  # seconds before the first resume; doubled for each next one
MAX_BACKOFF = 5.0
# RFC 9110 14.4; positions of at most 19 digits (an int64, as Go's and
# nginx's): a longer one is no answer to our Range, and Python refuses to
# read past 4300 digits.
CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")


class Refused(UpstreamError):
    """An answer to a Range request that no other attempt would mend: a
    Content-Range not as asked, a 200 of another size, a second 200."""


class Resume:
    """The resumes of one download (see the module docstring)."""

    __slots__ = ("_auth", "_ctx", "_deadline", "_restarted", "_target", "attempts", "opened",
                 "total")

    def __init__(self, ctx: FetchContext, target: Target, auth: str | None, opened: Opened,
                 total: int | None) -> None:
        self._ctx = ctx
        self._target = target
        self._auth = auth
        self.opened = opened  # the answer whose body is read now, with its hops
        self.total = total  # the blob's size, once an answer said it
        self.attempts = 0
        self._restarted = False
        self._deadline: float | None = None

    def __repr__(self) -> str:
        return f"<Resume {self._target.rpath.ref[:19]} {self.attempts} attempts>"

    async def reopen(self, broke: BaseException, written: int) -> int:
        """A new answer in self.opened whose body continues at `written`;
        returns how many of its first bytes to skip (0 after a 206). Raises
        the download's error when the bounds are spent or the registry is
        down."""
        self.opened.response.release()
        config = self._ctx.config.download
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + config.retry_budget
        error = broke
        while self.attempts < config.retries:
            delay = min(FIRST_BACKOFF * 2 ** self.attempts, MAX_BACKOFF)
            if loop.time() + delay > self._deadline:
                break
            await self._backoff(delay)
            self.attempts += 1
            log.info("resuming %s from %s at byte %d (attempt %d of %d): %s",
                     self._target.rpath.ref, self._target.domain, written, self.attempts,
                     config.retries, _reason(error))
            restarted = self._restarted
            try:
                skip = await self._ask(written)
            except (UpstreamUnreachable, NotFound, DestinationRefused, Refused):
                raise  # no other attempt would fare better
            except (CrProxyError, aiohttp.ClientError, TimeoutError, OSError) as err:
                self._ctx.metrics.resumes.labels(how="failed").inc()
                error = err
                continue
            how = "restart" if self._restarted and not restarted else "range"
            self._ctx.metrics.resumes.labels(how=how).inc()
            return skip
        raise _given_up(error, self._target, self.attempts) from error

    async def _backoff(self, delay: float) -> None:
        """Wait `delay` seconds, or less if the registry goes down meanwhile:
        then no attempt is made (UpstreamUnreachable)."""
        upstream, domain = self._ctx.upstream, self._target.domain
        if not upstream.is_down(domain):
            went_down = upstream.health.went_down
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(went_down.wait(), delay)
        if upstream.is_down(domain):
            raise UpstreamUnreachable(message=f"{domain} is down: download of "
                                      f"{self._target.rpath.ref} not resumed")

    async def _ask(self, written: int) -> int:
        """One attempt: the URL that served the bytes, else the registry."""
        headers = {"Range": f"bytes={written}-"}
        opened = self.opened
        if opened.hops:
            scheme, host, path = upstream_url(opened.hops[-1].location, "redirect")
            response = await self._ctx.upstream.send(
                "GET", host, path, headers, scheme=scheme,
                registry=self._target.domain)
            if response.status in (200, 206):
                return self._accept(Opened(response, opened.hops), written)
            # A signed URL expires (403, 404, 410...): the registry names a new one.
            log.info("%s answered %d to a resume of %s: asking %s again", host,
                     response.status, self._target.rpath.ref, self._target.domain)
            response.release()
        fresh = await self._ctx.upstream.open("GET", self._target, headers=headers,
                                              client_auth=self._auth)
        return self._accept(fresh, written)

    def _accept(self, opened: Opened, written: int) -> int:
        """Check an answer to a Range request; the bytes to skip of it."""
        response = opened.response
        try:
            skip = self._check(response, written)
        except BaseException:
            response.release()
            raise
        self.opened = opened
        return skip

    def _check(self, response: aiohttp.ClientResponse, written: int) -> int:
        ref, domain = self._target.rpath.ref, self._target.domain
        if response.status == 404:
            raise NotFound("BLOB_UNKNOWN", f"blob {ref} not found on {domain} any more")
        if response.status == 206:
            found = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            total = None if found is None or found[3] == "*" else int(found[3])
            if found is None or int(found[1]) != written or (
                    self.total is not None and (total != self.total or
                                                int(found[2]) != self.total - 1)):
                raise Refused(message=(
                    f"{domain}: Content-Range {response.headers.get('Content-Range')!r} of "
                    f"{ref} is not bytes {written}-/{self.total or '*'} as asked"))
            self.total = self.total if self.total is not None else total
            return 0
        if response.status == 200:
            if self._restarted:
                raise Refused(message=f"{domain} ignored Range twice for {ref}")
            if self.total is not None and response.content_length != self.total:
                raise Refused(message=(
                    f"{domain}: {ref} is {response.content_length} bytes now, "
                    f"{self.total} before"))
            self._restarted = True
            return written
        raise UpstreamError(message=f"{domain} answered {response.status} to a resume of {ref}")


def _reason(error: BaseException) -> str:
    return getattr(error, "message", None) or repr(error)


def _given_up(error: BaseException, target: Target, attempts: int) -> CrProxyError:
    """The download's error once no more resumes are made."""
    if isinstance(error, CrProxyError):
        return error
    what = f"{target.domain}: body of {target.rpath.ref} cut short"
    if attempts:
        what += f" ({attempts} resumes tried)"
    if isinstance(error, TimeoutError):
        return UpstreamTimeout(message=what)
    return Truncated(message=what)
