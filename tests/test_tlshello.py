"""tlshello: the server name in a ClientHello, from real handshakes (the ssl
module's, TLS 1.2 and 1.3) and from hand-built ones, whole, split across
reads and fragmented across records; and, for any bytes at all, an answer
or ProtocolError, nothing else."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cr_proxy.errors import ProtocolError
from cr_proxy.front import tlshello
from cr_proxy.front.tlshello import Hello, HelloReader, parse


def real_hello(sni: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    """The first flight of Python's TLS client: one ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def vec(size: int, data: bytes) -> bytes:
    return len(data).to_bytes(size, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return u16(kind) + vec(2, data)


def server_name(*names: tuple[int, bytes]) -> bytes:
    return extension(0, vec(2, b"".join(bytes([kind]) + vec(2, name) for kind, name in names)))


def hello_message(
    extensions: bytes | None, session_id: bytes = b"", trailer: bytes = b""
) -> bytes:
    body = b"\x03\x03" + bytes(32) + vec(1, session_id) + vec(2, b"\x13\x01") + vec(1, b"\x00")
    if extensions is not None:
        body += vec(2, extensions)
    body += trailer
    return bytes([1]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 1 << 14) -> bytes:
    """A handshake message in records of at most `size` bytes."""
    out = b""
    for start in range(0, len(message), size):
        out += b"\x16\x03\x01" + vec(2, message[start : start + size])
    return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_real_client_hellos(version: ssl.TLSVersion) -> None:
    assert parse(real_hello("registry.test", version)) == Hello("registry.test")
    assert parse(real_hello(None, version)) == Hello(None)


def test_every_split_of_a_real_hello_needs_more_until_it_is_whole() -> None:
    data = real_hello("registry.test")
    for cut in range(len(data)):
        assert parse(data[:cut]) is None, cut
    assert parse(data) == Hello("registry.test")
    # Bytes after it (early data, a pipelined record) change nothing.
    assert parse(data + b"\x17\x03\x03\x00\x05hello") == Hello("registry.test")


@pytest.mark.parametrize("size", [1, 2, 7, 100])
def test_a_hello_fragmented_across_records(size: int) -> None:
    message = hello_message(server_name((0, b"a.example")))
    data = records(message, size)
    assert parse(data) == Hello("a.example")
    assert parse(data[:-1]) is None


def test_without_extensions_or_without_sni() -> None:
    assert parse(records(hello_message(None))) == Hello(None)
    assert parse(records(hello_message(extension(10, b"\x00\x02\x00\x17")))) == Hello(None)


def test_other_name_types_are_skipped_by_their_length() -> None:
    ext = server_name((7, b"future"), (0, b"a.example"))
    assert parse(records(hello_message(ext))) == Hello("a.example")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake"),
        (b"\x80\x2e\x01\x00\x02", "not a TLS handshake"),  # SSLv2-style hello
        (b"\x16\x03\x01\x00\x00", "record of 0 bytes"),
        (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
        (records(b"\x02\x00\x00\x00"), "not a ClientHello"),
        (records(b"\x01\x01\x00\x00"), "too large"),
        (records(hello_message(server_name((0, b"a.test"), (0, b"b.test")))), "two host names"),
        (records(hello_message(extension(10, b"") + extension(10, b"") + server_name(
            (0, b"a.test")))), "sent twice"),
        (records(hello_message(server_name((0, b"")))), "empty or not ASCII"),
        (records(hello_message(server_name((0, "é.test".encode())))), "empty or not ASCII"),
        (records(hello_message(extension(0, b""))), "truncated"),
        (records(hello_message(extension(0, vec(2, b"")))), "malformed"),
        (records(hello_message(b"", session_id=bytes(33))), "legacy_session_id"),
        (records(hello_message(b"\x00")), "truncated"),
        (records(hello_message(b"", trailer=b"\x00")), "after the TLS ClientHello's extensions"),
    ],
)
def test_malformed_hellos_are_protocol_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse(data)


def test_size_is_bounded_while_bytes_still_arrive() -> None:
    """A client cannot make the front hold more than MAX_HELLO bytes: the
    refusal comes as soon as a record would end past it."""
    announced = records(b"\x01\x01\x00\x00" + bytes(100))  # 65540 bytes to come
    with pytest.raises(ProtocolError, match="too large"):
        parse(announced)
    # Within the announced size, but in 1-byte records: 6 bytes a byte.
    tiny = records(hello_message(server_name((0, b"a.test")) + extension(21, bytes(20000))), 1)
    with pytest.raises(ProtocolError, match="too large"):
        parse(tiny)


def test_alert_is_a_fatal_alert_record() -> None:
    assert tlshello.alert(tlshello.UNRECOGNIZED_NAME) == b"\x15\x03\x03\x00\x02\x02\x70"


# --- any bytes at all --------------------------------------------------------------


def outcome(data: bytes) -> Hello | str | None:
    try:
        return parse(data)
    except ProtocolError:
        return "error"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_an_answer_or_a_protocol_error(data: bytes) -> None:
    outcome(data)
    outcome(b"\x16\x03\x01" + data)
    outcome(b"\x16\x03\x01" + u16(len(data)) + data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.data())
def test_a_mutated_real_hello_gives_an_answer_or_a_protocol_error(
    position: int, value: int, data: st.DataObject
) -> None:
    hello = bytearray(real_hello("registry.test"))
    hello[position % len(hello)] = value
    cut = data.draw(st.integers(min_value=0, max_value=len(hello)))
    outcome(bytes(hello))
    outcome(bytes(hello[:cut]))


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
    st.integers(min_value=1, max_value=300),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_split_anywhere_and_fragmented_anyhow_the_name_comes_out_once_whole(
    name: str, record_size: int, cuts: list[int]
) -> None:
    """Reads as the front makes them: the buffer grows by whatever the
    client's segments bring; parse says "more" until the hello is whole."""
    data = records(hello_message(server_name((0, name.encode()))), record_size)
    points = sorted({c % len(data) for c in cuts})
    for point in points:
        assert parse(data[:point]) is None
    assert parse(data) == Hello(name)


def test_parsing_stops_at_server_name() -> None:
    """What follows server_name is left to OpenSSL in nginx (which refuses
    a second server_name); the front needs only the name."""
    twice = server_name((0, b"a.test")) + server_name((0, b"b.test"))
    assert parse(records(hello_message(twice))) == Hello("a.test")


class CountedBytes(bytearray):
    """The bytes a reader holds, counting what it takes out of them."""

    taken = 0

    def __getitem__(self, key):  # type: ignore[no-untyped-def, override]
        part = super().__getitem__(key)
        CountedBytes.taken += len(part) if isinstance(key, slice) else 1
        return part


def test_a_hello_trickled_in_tiny_records_is_read_once_not_again_per_byte() -> None:
    """A hello of 1-byte records, fed a byte at a time (as a client can
    trickle it within the head timeout): the reader takes each byte out
    of its buffer a bounded number of times. Parsing the whole buffer
    after each read cost the square of its size: 50 such clients held
    the event loop for seconds (a review finding, session 13)."""
    padding = extension(21, bytes(8000))  # a padding extension: a long hello
    data = records(hello_message(server_name((0, b"slow.test")) + padding), 1)
    reader = HelloReader()
    reader.received = CountedBytes()
    CountedBytes.taken = 0
    found = [reader.feed(data[i:i + 1]) for i in range(len(data))]
    assert found[-1] == Hello("slow.test") and found.count(None) == len(data) - 1
    assert bytes(reader.received) == data
    assert CountedBytes.taken <= 4 * len(data)
