"""The server name a TLS client asks for, from the first bytes of its
handshake. Pure (no I/O): the CONNECT front feeds a HelloReader the bytes
it reads until it has a whole ClientHello, then decides whether the host
it names may have a leaf.

Grammar (RFC 8446 5.1, 4, 4.1.2, 4.2; RFC 6066 3). All integers big-endian;
<a..b> is a vector whose length prefix takes as many bytes as b needs.

    struct {
        ContentType type;                   /* handshake(22) */
        ProtocolVersion legacy_record_version;
        uint16 length;                      /* MUST NOT exceed 2^14 */
        opaque fragment[TLSPlaintext.length];
    } TLSPlaintext;

    struct {                                /* may span several records */
        HandshakeType msg_type;             /* client_hello(1) */
        uint24 length;
        ClientHello body;
    } Handshake;

    struct {
        ProtocolVersion legacy_version;
        Random random;                      /* 32 bytes */
        opaque legacy_session_id<0..32>;
        CipherSuite cipher_suites<2..2^16-2>;
        opaque legacy_compression_methods<1..2^8-1>;
        Extension extensions<8..2^16-1>;    /* absent in some TLS 1.2 hellos */
    } ClientHello;

    struct {
        ExtensionType extension_type;       /* server_name(0) */
        opaque extension_data<0..2^16-1>;
    } Extension;

    struct {
        ServerName server_name_list<1..2^16-1>
    } ServerNameList;

    struct {
        NameType name_type;                 /* host_name(0) */
        select (name_type) {
            case host_name: HostName;       /* opaque HostName<1..2^16-1> */
        } name;
    } ServerName;

RFC 6066 3: "all future data structures associated with new NameTypes MUST
begin with a 16-bit length field", so other name types are skipped by it;
"The ServerNameList MUST NOT contain more than one name of the same
name_type"; HostName is ASCII, without a trailing dot. RFC 8446 4.2:
"There MUST NOT be more than one extension of the same type".
"""

from __future__ import annotations

from dataclasses import dataclass

from cr_proxy.errors import ProtocolError

HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME = 0
HOST_NAME = 0
RECORD_HEADER = 5
MAX_RECORD = 1 << 14
# Bytes of records a ClientHello may take, headers included. One with
# post-quantum key shares is about 1.8 KB; 64 KiB leaves room for many PSK
# identities and still bounds what a client makes us hold.
MAX_HELLO = 64 << 10

ALERT = 21
FATAL = 2
UNRECOGNIZED_NAME = 112  # RFC 6066 3: the server does not know that name
ACCESS_DENIED = 49


@dataclass(frozen=True, slots=True)
class Hello:
    server_name: str | None  # the host_name asked for; None: no SNI


def parse(buffer: bytes) -> Hello | None:
    """The ClientHello at the start of `buffer`, or None: need more bytes.
    Raises ProtocolError when the bytes are not a TLS ClientHello, or when
    it and its record headers would take more than MAX_HELLO bytes."""
    return HelloReader().feed(buffer)


class HelloReader:
    """parse() over bytes as they come, without starting again: the records
    already whole stay joined, so each byte is looked at once however the
    client cuts its hello (1-byte records trickled in: parsing the whole
    buffer after each read cost the square of its size)."""

    __slots__ = ("_message", "_pos", "received")

    def __init__(self) -> None:
        self.received = bytearray()  # every byte read, for nginx
        self._message = bytearray()  # the handshake message, from the whole records
        self._pos = 0  # where the first record not yet whole begins

    def __repr__(self) -> str:
        return f"<HelloReader {len(self.received)} bytes, {len(self._message)} of message>"

    def feed(self, data: bytes) -> Hello | None:
        """The hello once whole (its records' bytes so far with `data`),
        else None. Each record adds at least one byte to the message and
        moves past its end, so this ends."""
        buffer, message = self.received, self._message
        buffer += data
        while len(buffer) - self._pos >= RECORD_HEADER:
            pos = self._pos
            kind, major = buffer[pos], buffer[pos + 1]
            length = int.from_bytes(buffer[pos + 3 : pos + 5], "big")
            if kind != HANDSHAKE or major != 3:
                raise ProtocolError(message="not a TLS handshake")
            if not 0 < length <= MAX_RECORD:
                raise ProtocolError(message=f"TLS record of {length} bytes")
            end = pos + RECORD_HEADER + length
            if end > MAX_HELLO:
                raise ProtocolError(message="TLS ClientHello too large")
            if end > len(buffer):
                return None
            message += buffer[pos + RECORD_HEADER : end]
            self._pos = end
            if message[0] != CLIENT_HELLO:
                raise ProtocolError(message="the first handshake message is not a ClientHello")
            if len(message) >= 4:
                total = 4 + int.from_bytes(message[1:4], "big")
                if total > MAX_HELLO:
                    raise ProtocolError(message="TLS ClientHello too large")
                if len(message) >= total:
                    return Hello(_server_name(bytes(message[:total])))
        if self._pos + RECORD_HEADER > MAX_HELLO:
            raise ProtocolError(message="TLS ClientHello too large")
        return None


def _vector(data: bytes, pos: int, size: int, end: int) -> tuple[int, int]:
    """Where the vector at `pos` with a `size`-byte length starts and ends."""
    start = pos + size
    if start > end:
        raise ProtocolError(message="truncated TLS ClientHello")
    stop = start + int.from_bytes(data[pos:start], "big")
    if stop > end:
        raise ProtocolError(message="truncated TLS ClientHello")
    return start, stop


def _server_name(message: bytes) -> str | None:
    """Walked by offsets, not copies: the front parses one per connection."""
    end = len(message)
    pos = 4 + 2 + 32  # msg_type and length (checked already), legacy_version, random
    start, pos = _vector(message, pos, 1, end)  # legacy_session_id
    if pos - start > 32:
        raise ProtocolError(message="TLS legacy_session_id longer than 32 bytes")
    start, pos = _vector(message, pos, 2, end)  # cipher_suites
    if pos - start < 2 or (pos - start) % 2:
        raise ProtocolError(message="malformed TLS cipher_suites")
    start, pos = _vector(message, pos, 1, end)  # legacy_compression_methods
    if pos == start:
        raise ProtocolError(message="empty TLS legacy_compression_methods")
    if pos == end:
        return None  # a TLS 1.2 ClientHello may carry no extensions at all
    pos, stop = _vector(message, pos, 2, end)
    if stop != end:
        raise ProtocolError(message="bytes after the TLS ClientHello's extensions")
    # Up to server_name only (Go's clients, docker's and skopeo's, send it
    # first): what follows is OpenSSL's to check, in nginx, which refuses a
    # second server_name with the handshake.
    seen: set[int] = set()
    while pos < end:
        kind = int.from_bytes(message[pos : pos + 2], "big")
        start, pos = _vector(message, pos + 2, 2, end)
        if kind == SERVER_NAME:
            return _host_name(message[start:pos])
        if kind in seen:
            raise ProtocolError(message=f"TLS extension {kind} sent twice")
        seen.add(kind)
    return None


def _host_name(data: bytes) -> str | None:
    """The host_name of a server_name extension's ServerNameList."""
    pos, end = _vector(data, 0, 2, len(data))
    if end != len(data) or pos == end:
        raise ProtocolError(message="malformed TLS server_name extension")
    host = None
    while pos < end:
        kind = data[pos]
        # HostName, or a future type's: "MUST begin with a 16-bit length field"
        start, pos = _vector(data, pos + 1, 2, end)
        if kind != HOST_NAME:
            continue
        value = data[start:pos]
        if host is not None:
            raise ProtocolError(message="two host names in TLS server_name")
        if not value or not value.isascii():
            raise ProtocolError(message="TLS server_name is empty or not ASCII")
        host = value.decode("ascii")
    return host


def alert(description: int) -> bytes:
    """A fatal TLS alert record (RFC 8446 6): how a server refuses a
    handshake before it has keys, e.g. unrecognized_name for an SNI it will
    not serve (RFC 6066 3)."""
    return bytes((ALERT, 3, 3, 0, 2, FATAL, description))
