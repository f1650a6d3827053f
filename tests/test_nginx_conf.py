"""The nginx templates (nginx/*.conf, cr.js) against the rules the Python
side relies on: which headers reach the fetcher, which every answer
carries, and which stored values a hit may replay."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cr_proxy import nginx

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "nginx"
NOSNIFF = "add_header X-Content-Type-Options nosniff always;"
# Every nginx configuration a server runs: the templates and the snippets
# cr_proxy/nginx.py writes (they define locations of their own), among them
# locations.conf as rendered for each server.
CONFS = {
    **{p.name: p.read_text() for p in sorted(TEMPLATES.glob("*.conf"))},
    "MIRROR_DENY": nginx.MIRROR_DENY,
    "REJECT_RAW": nginx.REJECT_RAW,
    **{name: nginx.locations(server, Path("/cache"))
       for name, server in nginx.LOCATION_FILES.items()},
}


def strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                     for line in text.splitlines())


def blocks(text: str, keyword: str) -> list[tuple[str, str]]:
    """(head, body) of every `keyword ... { body }` block; braces inside
    quotes (regex counts like {64}) are not block braces."""
    text = strip_comments(text)
    out = []
    for match in re.finditer(rf"(?m)^\s*{keyword}\b", text):
        depth, quote, start = 0, "", None
        for i in range(match.start(), len(text)):
            char = text[i]
            if quote:
                quote = "" if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "{":
                depth += 1
                if start is None:
                    start = i
            elif char == "}":
                depth -= 1
                if depth == 0:
                    out.append((text[match.start():start].strip(), text[start + 1:i]))
                    break
    return out


def own_lines(body: str) -> str:
    """A block's body without its nested blocks (`if` keeps its own scope).
    Comments go first: an apostrophe in one is no quote."""
    out, depth, quote = [], 0, ""
    for char in strip_comments(body):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
            continue
        elif char == "}":
            depth -= 1
            continue
        if depth == 0:
            out.append(char)
    return "".join(out)


def test_blocks_finds_every_location() -> None:
    found = [head for text in CONFS.values() for head, _ in blocks(text, "location")]
    assert {"location @fetch", "location = /v2/", "location = /_cr/denied",
            "location = /_cr/raw-bytes", 'location ~ "/$"', "location /",
            'location ~ "^/v2/(?<cr_name>.+?)/blobs/(?<cr_digest>sha256:[a-f0-9]{64})$"'
            } <= set(found), found
    assert found.count("location /") == 2  # the mirror's and the https_proxy's


@pytest.mark.parametrize("name", sorted(CONFS))
def test_every_location_with_headers_of_its_own_says_nosniff(name: str) -> None:
    """nginx's add_header is inherited only by a level with none of its own:
    a location that adds any header must add nosniff itself, with `always`
    so that its errors carry it too."""
    for head, body in blocks(CONFS[name], "location"):
        lines = own_lines(body)
        if "add_header" in lines:
            assert NOSNIFF in lines, f"{name}: {head} adds headers but not nosniff"


def test_the_http_level_says_nosniff_for_every_other_answer() -> None:
    (_, http), = blocks(CONFS["nginx.conf"], "http")
    assert NOSNIFF in own_lines(http)
    for _, server in blocks(CONFS["nginx.conf"], "server"):
        assert "add_header" not in own_lines(server)  # it would hide the http level's
    assert "add_header" not in own_lines(CONFS["proxy-server.conf"])


def internal_headers() -> set[str]:
    """Every X-CR-* header name the Python side reads or sends."""
    names = set()
    for source in (ROOT / "cr_proxy").rglob("*.py"):
        names |= set(re.findall(r"X-CR-[A-Za-z][A-Za-z-]*[A-Za-z]", source.read_text()))
    return names


def test_fetch_conf_overrides_every_internal_header() -> None:
    """A client's X-CR-* header must never reach the fetcher: fetch.conf
    sets each one (to nginx's own value, or "" which drops it). A new
    header the fetcher reads fails here until fetch.conf sets it."""
    names = internal_headers()
    assert {"X-CR-Mode", "X-CR-Scheme", "X-CR-Revalidate", "X-CR-Cache-Only"} <= names
    fetch = dict(blocks(CONFS["fetch.conf"], "location"))["location @fetch"]
    overridden = set(re.findall(r"proxy_set_header\s+(X-CR-[A-Za-z-]+)\s", fetch))
    assert names <= overridden, names - overridden
    assert "proxy_pass_request_headers off" not in fetch  # the override is what protects
