"""Tag lists (`GET /v2/<name>/tags/list`), pure: the paging query cr-proxy
accepts (`n`, `last`), an upstream's answer checked and made canonical, and
the next page its `Link` header names.

A query is a cache key (one stored answer per query, cache/layout.py's
`Tree.listing`), so only a bounded `n` and a valid tag `last` make one;
anything else is the client's 400. An upstream's list is stored and served
only as `{"name": <the name asked for>, "tags": [<valid tags>]}`: whatever
else it sent (another name, not JSON, HTML) is a 502, never stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from cr_proxy.errors import BadRequest, UpstreamError
from cr_proxy.oci.reference import is_name, is_tag

MAX_TAGS_N = 10000  # a page size beyond any registry's (distribution v3 caps at 1000)
MAX_TAG_LIST = 4 << 20  # bytes of one tag list page (MAX_MANIFEST's bound)
N_RE = re.compile(r"[0-9]{1,5}")
# `Link: <url>; rel="next"` (distribution and Docker Hub send exactly this).
LINK_RE = re.compile(r'\s*<([^<>]*)>\s*;\s*rel="?next"?\s*')


@dataclass(frozen=True, slots=True)
class TagQuery:
    """A checked paging query; `file_name` is its stored answer's name."""

    n: int | None = None
    last: str | None = None

    @classmethod
    def parse(cls, n: str | None, last: str | None) -> TagQuery:
        """From a client's parameters: BadRequest for any bad one."""
        if n is not None and (not N_RE.fullmatch(n) or int(n) > MAX_TAGS_N):
            raise BadRequest("PAGINATION_NUMBER_INVALID",
                             f"n must be an integer from 0 to {MAX_TAGS_N}, not {n[:20]!r}")
        if last is not None and not is_tag(last):
            raise BadRequest("TAG_INVALID", f"last is not a tag: {last[:140]!r}")
        return cls(None if n is None else int(n), last)

    @property
    def file_name(self) -> str:
        """`list`, `list,n=<n>`, `list,last=<tag>`, `list,n=<n>,last=<tag>`:
        one name per query (n as an integer: 010 and 10 are one), and no
        tag can hold ',' or '=', so no two queries share a name."""
        parts = ["list"]
        if self.n is not None:
            parts.append(f"n={self.n}")
        if self.last is not None:
            parts.append(f"last={self.last}")
        return ",".join(parts)

    @classmethod
    def from_file_name(cls, file_name: str) -> TagQuery | None:
        """The query `file_name` stores (its inverse), or None for a name
        it never makes."""
        first, *parts = file_name.split(",")
        values = dict(part.partition("=")[::2] for part in parts)
        if first != "list" or len(values) != len(parts) or set(values) - {"n", "last"}:
            return None
        try:
            query = cls.parse(values.get("n"), values.get("last"))
        except BadRequest:
            return None
        return query if query.file_name == file_name else None

    def params(self) -> list[tuple[str, str]]:
        """The query's parameters, for an upstream's URL or a Link."""
        out = []
        if self.n is not None:
            out.append(("n", str(self.n)))
        if self.last is not None:
            out.append(("last", self.last))
        return out


@dataclass(frozen=True, slots=True)
class TagPage:
    """One page of a tag list as stored: the list and the next page's query
    (from the upstream's Link), if any."""

    name: str
    tags: tuple[str, ...]
    next: TagQuery | None = None

    def cut(self, query: TagQuery) -> TagPage:
        """The page `query` asks of this whole list, as a registry pages it
        (the spec's lexical order): the tags after `last`, at most `n`, and
        the next page's query when more are left."""
        after = tuple(sorted(t for t in self.tags if query.last is None or t > query.last))
        if query.n is None or len(after) <= query.n:
            return TagPage(self.name, after)
        page = after[:query.n]
        return TagPage(self.name, page, TagQuery(query.n, page[-1]) if page else None)

    def list_body(self) -> bytes:
        """What a client gets: the registry's JSON, canonical."""
        return json.dumps({"name": self.name, "tags": list(self.tags)}).encode()

    def stored(self) -> bytes:
        doc: dict[str, object] = {"name": self.name, "tags": list(self.tags)}
        if self.next is not None:
            doc["next"] = dict(self.next.params())
        return json.dumps(doc).encode()


def parse_tag_list(body: bytes, name: str, link: str | None) -> TagPage:
    """An upstream's page, checked: JSON, its name the one asked for, every
    tag a valid tag (null or no tags: an empty list, as distribution sends
    for a repository without tags); the next page from its Link header.
    UpstreamError when it is not such a page."""
    doc = _checked(body, name)
    return TagPage(name, tuple(doc.get("tags") or ()), next_page(link))


def parse_stored(body: bytes, name: str) -> TagPage:
    """A page as TagPage.stored() wrote it, checked again."""
    doc = _checked(body, name)
    return TagPage(name, tuple(doc.get("tags") or ()), _stored_next(doc.get("next")))


def _checked(body: bytes, name: str) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # nested past the stack
        raise UpstreamError(message=f"the tag list of {name} is not JSON") from err
    if not isinstance(doc, dict):
        raise UpstreamError(message=f"the tag list of {name} is not a JSON object")
    if doc.get("name") != name:
        shown = str(doc.get("name"))[:100]
        raise UpstreamError(message=f"the tag list of {name} names another repository: {shown!r}")
    tags = doc.get("tags")
    tags = [] if tags is None else tags  # null is distribution's "none"; "", {}, 0 are no list
    if not isinstance(tags, list) or not all(isinstance(t, str) and is_tag(t) for t in tags):
        raise UpstreamError(message=f"the tag list of {name} holds something not a tag")
    return doc


def listed_name(path: str) -> str | None:
    """The repository of a `/v2/<name>/tags/list` URL path (a redirect's
    target), or None when the path is not one."""
    prefix, suffix = "/v2/", "/tags/list"
    if not (path.startswith(prefix) and path.endswith(suffix)):
        return None
    name = path[len(prefix):-len(suffix)]
    return name if is_name(name) else None


def next_page(link: str | None) -> TagQuery | None:
    """The next page's query from an upstream's Link header; None when
    there is none, or when it names parameters we would not accept from a
    client (then the client gets this page without a Link: paging stops
    rather than carry the upstream's URL)."""
    if not link:
        return None
    match = LINK_RE.fullmatch(link)
    if match is None:
        return None
    query = parse_qs(urlsplit(match.group(1)).query)
    try:
        return TagQuery.parse(_one(query.get("n")), _one(query.get("last")))
    except BadRequest:
        return None


def _one(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _stored_next(value: object) -> TagQuery | None:
    if not isinstance(value, dict):
        return None
    n, last = value.get("n"), value.get("last")
    if not all(v is None or isinstance(v, str) for v in (n, last)):
        return None
    try:
        return TagQuery.parse(n, last)
    except BadRequest:
        return None
