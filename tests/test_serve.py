"""cr_proxy.serve: the pure parts (the rest runs through `cr-proxy serve` in
the e2e tests)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cr_proxy import serve
from cr_proxy.config import build, default_data

MIB = 1 << 20


@pytest.mark.parametrize(("somaxconn", "warned"), [("128\n", True), ("4096\n", False),
                                                    ("65535\n", False), ("junk", False)])
def test_a_kernel_cap_below_the_fetcher_backlog_is_warned_about(
    somaxconn: str, warned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "somaxconn"
    path.write_text(somaxconn)
    monkeypatch.setattr(serve, "SOMAXCONN", path)
    with caplog.at_level(logging.WARNING, logger="cr_proxy.serve"):
        serve._warn_if_backlog_capped()
    assert ("net.core.somaxconn is 128" in caplog.text) is warned


def test_no_somaxconn_file_is_no_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(serve, "SOMAXCONN", tmp_path / "absent")
    with caplog.at_level(logging.WARNING, logger="cr_proxy.serve"):
        serve._warn_if_backlog_capped()
    assert caplog.text == ""


@pytest.mark.parametrize(("listen", "named"), [
    ("5000", "{hostname}:5000"), ("0.0.0.0:5000", "{hostname}:5000"),
    ("[::]:5000", "{hostname}:5000"), ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("10.0.0.7:5000", "10.0.0.7:5000"), ("[::1]:5000", "[::1]:5000"),
])
def test_the_hint_names_the_address_a_mirror_listens_on(listen: str, named: str) -> None:
    """A wildcard listener is reached by this machine's name; one bound to
    one address only there (the e2e test: tests/test_e2e_quiet.py)."""
    data = default_data()
    data["listen"].update(mirror_http=listen, mirror_https=0, proxy=0)
    hints = serve.client_hints(build(data, environ={}))
    at = named.format(hostname=socket.gethostname())
    assert hints[0] == f"mirror (HTTP)  http://{at}"
    assert f'"registry-mirrors": ["http://{at}"]' in hints[-1]
    assert f"docker://{at}/docker.io/library/alpine" in hints[-1]


# Run in a child: mallopt changes the whole process's allocator.
KEPT_BUFFERS = """
import ctypes
import sys

from cr_proxy import serve

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p

def block(size):
    # mapped on its own (1) or from the heap (0)
    before = libc.mallinfo2().hblks
    pointer = libc.malloc(size)
    mapped = libc.mallinfo2().hblks - before
    libc.free(ctypes.c_void_p(pointer))
    return mapped

def blocks(count, size):
    # heap bytes held once `count` blocks are freed together (a burst's)
    pointers = [libc.malloc(size) for _ in range(count)]
    for pointer in pointers:
        libc.free(ctypes.c_void_p(pointer))
    return libc.mallinfo2().arena

if sys.argv[1] == "tuned":
    serve._keep_freed_buffers()
MIB = 1 << 20
print(block(3 * MIB), block(3 * MIB + MIB // 2), block(8 * MIB), blocks(8, 3 * MIB))
"""


@pytest.mark.parametrize("tuned", [False, True])
def test_download_sized_buffers_stay_in_the_heap_once_freed(tuned: bool) -> None:
    """A buffer of a few MiB (a body's, a batch's) comes from the heap and
    stays there when freed (_keep_freed_buffers), where glibc's defaults
    map and unmap it each time; bigger ones are still mapped. Untuned, the
    same 3.5 MiB block is mapped: the check can fail."""
    out = subprocess.run([sys.executable, "-c", KEPT_BUFFERS, "tuned" if tuned else "default"],
                         capture_output=True, text=True, check=True).stdout.split()
    first, mapped, big, kept = (int(x) for x in out)
    if tuned:
        assert (first, mapped, big) == (0, 0, 1)
        assert kept >= 24 * MIB  # freed, and kept for the next burst
    else:
        assert (first, mapped) == (1, 1)
        assert kept < 24 * MIB
