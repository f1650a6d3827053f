"""cache/direct.py: a pushed upload's whole stages go to the disk around the
page cache, its tail through it; the bytes, size and digest are a
BlobWriter's whatever the pieces, short writes or a filesystem that refuses
O_DIRECT."""

from __future__ import annotations

import errno
import itertools
import os
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.cache import direct
from cr_proxy.cache.direct import DirectWriter
from cr_proxy.cache.store import Store
from cr_proxy.oci.reference import digest_of
from testbed.pagecache import resident_bytes

STAGE = 8192  # two blocks: the tests cross many stage edges with little data
DATA = os.urandom(3 * STAGE + 1234)
DIGEST = digest_of(DATA)


@pytest.fixture(autouse=True)
def small_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "STAGE", STAGE)


def committed(writer: DirectWriter, chunks: list[bytes]) -> None:
    """Write the chunks in two batches and close as a commit does."""
    writer.write_all(chunks[:len(chunks) // 2])
    writer.write_all(chunks[len(chunks) // 2:])
    writer.verify(sum(map(len, chunks)))
    writer.sync_and_close()


def written(writer: DirectWriter, chunks: list[bytes]) -> bytes:
    """committed(), then the file's bytes."""
    committed(writer, chunks)
    return writer.path.read_bytes()


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, len(DATA)), max_size=30),
       short=st.lists(st.integers(1, 3 * STAGE), max_size=6))
def test_any_pieces_and_short_writes_give_the_bytes_in_order(tmp_path_factory, cuts, short):
    """Any split (empty pieces too), and writes that take only part of what
    they are given (a full disk's, a signal's: an unaligned rest is then
    refused by O_DIRECT and written through the page cache)."""
    edges = [0, *sorted(cuts), len(DATA)]
    chunks = [DATA[a:b] for a, b in itertools.pairwise(edges)]
    real_write, limits = os.write, list(short)

    def write(fd: int, data: memoryview) -> int:
        return real_write(fd, data[:limits.pop(0)] if limits else data)

    writer = DirectWriter(tmp_path_factory.mktemp("temp"), DIGEST)
    with mock.patch("cr_proxy.cache.direct.os.write", write):
        assert written(writer, chunks) == DATA
    assert writer.size == len(DATA)


@pytest.mark.parametrize("size", [0, 1, STAGE - 1, STAGE, 4 * STAGE])
def test_sizes_at_the_stage_edges(tmp_path, size):
    data = DATA[:size] if size <= len(DATA) else os.urandom(size)
    writer = DirectWriter(tmp_path, digest_of(data))
    assert written(writer, [data]) == data


def test_whole_stages_bypass_the_page_cache_and_the_tail_does_not(tmp_path):
    writer = DirectWriter(tmp_path, DIGEST)
    assert writer.direct, "the test's filesystem takes O_DIRECT"
    committed(writer, [DATA])
    tail = len(DATA) % STAGE
    assert resident_bytes(writer.path) <= tail + 4096  # the tail's pages, no stage's
    assert writer.path.read_bytes() == DATA


def test_a_filesystem_that_refuses_o_direct_gets_plain_writes(tmp_path):
    with mock.patch("cr_proxy.cache.direct._set_direct", return_value=False):
        writer = DirectWriter(tmp_path, DIGEST)
    assert not writer.direct
    committed(writer, [DATA[:5000], DATA[5000:]])
    assert resident_bytes(writer.path) >= len(DATA)  # through the page cache
    assert writer.path.read_bytes() == DATA


def test_a_direct_write_refused_after_all_falls_back_to_plain_writes(tmp_path):
    real_write, refused = os.write, []

    def write(fd: int, data: memoryview) -> int:
        if not refused:  # the first write only
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    writer = DirectWriter(tmp_path, DIGEST)
    with mock.patch("cr_proxy.cache.direct.os.write", write):
        assert written(writer, [DATA]) == DATA
    assert refused == [STAGE]


def test_einval_from_a_plain_write_reaches_the_caller(tmp_path):
    """Only a direct write's EINVAL means "write it plainly": one from the
    plain write after it is an error, not a loop."""
    writer = DirectWriter(tmp_path, DIGEST)
    with mock.patch("cr_proxy.cache.direct.os.write",
                    side_effect=OSError(errno.EINVAL, "Invalid argument")) as write, \
            pytest.raises(OSError, match="Invalid argument"):
        writer.write_all([DATA])
    assert write.call_count == 2  # direct, then plain
    writer.abort()


def test_other_write_errors_reach_the_caller(tmp_path):
    writer = DirectWriter(tmp_path, DIGEST)
    with mock.patch("cr_proxy.cache.direct.os.write",
                    side_effect=OSError(errno.ENOSPC, "No space left on device")), \
            pytest.raises(OSError, match="No space"):
        writer.write_all([DATA])
    writer.abort()
    assert not writer.path.exists()


def test_abort_midway_leaves_no_file_and_frees_the_stage(tmp_path):
    writer = DirectWriter(tmp_path, DIGEST)
    writer.write_all([DATA[:STAGE + 10]])
    writer.abort()
    writer.abort()
    assert not writer.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_pushed_upload_is_written_by_a_direct_writer(tmp_path):
    store = Store(tmp_path / "cache")
    store.prepare()
    writer = store.upload_writer()
    assert isinstance(writer, DirectWriter)
    writer.abort()
