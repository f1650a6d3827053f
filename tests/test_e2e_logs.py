"""nginx's access log kept to access_log_max_size by a running serve: past
it, the file becomes access.log.1 and nginx writes a new access.log, and
no line is lost on the way."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

from testbed.crproxy import CrProxy
from testbed.registry import Upstream
from tests.conftest import proxy_endpoints
from tests.faulty import wait_until

LIMIT = 4096  # bytes: about 25 lines


def test_access_log_past_its_size_is_rotated_and_nginx_writes_a_new_one(
    upstream: Upstream, tmp_path: Path
) -> None:
    with CrProxy(tmp_path / "crproxy", proxy_endpoints(upstream),
                 access_log_max_size=LIMIT) as proxy:
        rotated = proxy.access_log.with_name("access.log.1")
        sent: list[str] = []

        def get(tag: str) -> None:
            path = f"/v2/?{tag}={uuid.uuid4().hex}"
            urllib.request.urlopen(f"http://{proxy.http}{path}", timeout=30).read()
            sent.append(path)

        # More than the limit, less than twice it: one rotation, nothing dropped.
        for _ in range(40):
            get("fill")
        wait_until(rotated.exists, 30, "serve to rotate the access log")
        assert rotated.stat().st_size >= LIMIT

        def where(path: str) -> str:
            for log in (proxy.access_log, rotated):
                if log.exists() and f"GET {path} " in log.read_text():
                    return log.name
            return ""

        # A worker may write to the renamed file until it has reopened: a
        # marker at a time, until one is in the new file.
        for _ in range(20):
            get("after")
            marker = sent[-1]
            wait_until(lambda m=marker: where(m), 30, "the marker's line")
            if where(marker) == "access.log":
                break
        assert where(sent[-1]) == "access.log"

        def logged() -> list[str]:
            text = rotated.read_text() + proxy.access_log.read_text()
            return [path for path in sent if f"GET {path} " in text]

        # Every request is in one of the two files, once each worker flushed.
        wait_until(lambda: len(logged()) == len(sent), 30, "every request's line")
        assert "rotated" in proxy.log_text() or "renamed" in proxy.log_text()
