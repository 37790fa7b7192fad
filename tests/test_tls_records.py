"""The TLS receive path with fewer calls into OpenSSL (``tls_records.read_records_directly``),
against a real client TLS stack over memory BIOs: records are delivered whole and in
order, however the bytes are cut, and close_notify and garbage still end the
connection the way Twisted's own path does."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from mailappliance.sessions import write_and_close, write_records_at_once
from mailappliance.tls_records import read_records_directly


class Lower:
    """The TCP connection beneath the TLS layer: keeps what is written, notes a close."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.out.extend(data)

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def loseConnection(self) -> None:
        self.closed = True

    abortConnection = loseConnection


class Collect(protocol.Protocol):
    """Keeps what arrives, answers each piece with its length."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(b"%d\r\n" % len(data))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


class Pair:
    """Our TLS server layer and a client ``ssl.SSLObject``, joined by hand."""

    def __init__(self, pki, direct: bool) -> None:
        server_options, _ = pki.twisted_contexts()
        self.app = Collect()
        self.clock = Clock()
        factory = TLSMemoryBIOFactory(server_options, False, protocol.Factory.forProtocol(lambda: self.app),
                                      clock=self.clock)
        self.tls: TLSMemoryBIOProtocol = factory.buildProtocol(("127.0.0.1", 1))
        self.lower = Lower()
        self.direct = direct
        self.tls.makeConnection(self.lower)
        if direct:  # installed before the handshake, as for implicit TLS
            write_records_at_once(self.tls)
            read_records_directly(self.tls)
        self.tls.write(b"220 greeting\r\n")  # written before the handshake, like an implicit-TLS greeting
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = pki.client_context().wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        for _ in range(20):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.to_client()
                self.to_server(self.outgoing.read())
        self.to_server(self.outgoing.read())
        self.to_client()
        self.greeting = self.from_server()

    def to_server(self, data: bytes) -> None:
        if data:
            self.tls.dataReceived(data)
        self.clock.advance(0)

    def to_client(self) -> None:
        if self.lower.out:
            self.incoming.write(b"".join(self.lower.out))
            self.lower.out.clear()

    def from_server(self) -> bytes:
        self.to_client()
        got = b""
        try:
            while piece := self.client.read(1 << 20):  # b"" after the server's close_notify
                got += piece
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        return got

    def records(self, *texts: bytes) -> bytes:
        for text in texts:
            self.client.write(text)
        return self.outgoing.read()


@pytest.fixture(params=["direct", "twisted"])
def pair(request, pki) -> Iterator[Pair]:
    """Each test runs on our path and on Twisted's, which must behave the same."""
    yield Pair(pki, request.param == "direct")


def test_several_records_in_one_read_are_each_delivered_in_order(pair) -> None:
    """Three records arriving in one TCP read reach the session in order, each answered."""
    pair.to_server(pair.records(b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"))
    assert pair.app.received == [b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"]
    assert pair.from_server() == b"27\r\n25\r\n6\r\n"


def test_records_cut_at_every_byte_arrive_whole(pair) -> None:
    """A record that arrives one byte at a time is delivered once, whole, when its last byte comes."""
    wire = pair.records(b"x" * 3000, b"y" * 20000)  # the second one spans two records
    for i in range(len(wire)):
        pair.to_server(wire[i:i + 1])
    assert b"".join(pair.app.received) == b"x" * 3000 + b"y" * 20000
    assert all(len(piece) <= 16 * 1024 for piece in pair.app.received)



def test_a_full_record_then_a_short_one_in_one_read_are_both_delivered(pair) -> None:
    """A record of exactly 16 KiB fills the read buffer (OpenSSL is asked what is left); the next one still comes."""
    pair.to_server(pair.records(b"a" * 16384, b"tail\r\n"))
    assert pair.app.received == [b"a" * 16384, b"tail\r\n"]

def test_close_notify_ends_the_connection_as_twisted_does(pair) -> None:
    """A client's close_notify after data in the same read: the data is delivered, then the connection closed."""
    pair.client.write(b"QUIT\r\n")
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.unwrap()  # sends our close_notify, waits for the server's
    pair.to_server(pair.outgoing.read())
    assert pair.app.received == [b"QUIT\r\n"]
    assert pair.lower.closed


def test_garbage_after_the_handshake_ends_the_connection(pair) -> None:
    """Bytes that are no TLS record end the connection with an error instead of reaching the session."""
    pair.to_server(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data that fails to decrypt
    assert pair.app.received == []
    assert pair.lower.closed


def test_a_write_before_the_handshake_arrives_after_it(pair) -> None:
    """What the server writes before the handshake is done (the greeting) reaches the client once it is."""
    assert pair.greeting == b"220 greeting\r\n"


def test_writes_of_any_size_arrive_whole_and_in_order(pair) -> None:
    """Small replies, one bigger than a record and an empty one arrive whole and in order."""
    pieces = [b"250 ok\r\n", bytes(range(256)) * 300, b"", b"221 bye\r\n", bytearray(b"x" * 100)]
    for piece in pieces:
        pair.tls.write(piece)
    pair.clock.advance(0)
    assert pair.from_server() == b"".join(pieces)


def test_a_write_after_loseconnection_is_dropped_as_twisted_does(pair) -> None:
    """After loseConnection (no producer) a write is dropped and the close_notify still goes out."""
    pair.tls.write(b"221 bye\r\n")
    pair.tls.loseConnection()
    pair.tls.write(b"late\r\n")
    pair.clock.advance(0)
    assert pair.from_server() == b"221 bye\r\n"


def test_a_reply_is_handed_to_the_connection_at_once(pair) -> None:
    """One small write after the handshake is on its way to the client without a reactor turn."""
    pair.tls.write(b"250 ok\r\n")
    if pair.direct:
        assert pair.lower.out  # Twisted's gatherer would hold it until the next reactor pass
    pair.clock.advance(0)
    assert pair.from_server() == b"250 ok\r\n"



def read_to_close(pair: Pair) -> bytes:
    """Everything the client can read, which must end with the server's close_notify."""
    pair.to_client()
    got = b""
    # b"" only at the close_notify; data that stops without one raises SSLWantReadError
    while piece := pair.client.read(1 << 16):
        got += piece
    return got


def test_last_reply_and_close_notify_leave_in_one_write(pair) -> None:
    """``write_and_close``: the client gets the last reply, then a clean close; on our path both in one send."""
    pair.tls.write(b"250 ok\r\n")
    pair.clock.advance(0)
    pair.to_client()
    write_and_close(pair.tls, b"221 bye\r\n")
    pair.clock.advance(0)
    if pair.direct:
        assert len(pair.lower.out) == 1  # the 221 record and the close_notify, one write to the socket
    assert read_to_close(pair) == b"250 ok\r\n221 bye\r\n"


def test_close_with_nothing_to_say_still_sends_close_notify(pair) -> None:
    """``write_and_close`` without data is a plain TLS close."""
    write_and_close(pair.tls, b"")
    pair.clock.advance(0)
    assert read_to_close(pair) == b""


def test_a_last_reply_bigger_than_a_record_arrives_whole_before_the_close(pair) -> None:
    """A last write that does not fit one record takes the ordinary path, whole and before the close."""
    big = b"x" * 40000
    write_and_close(pair.tls, big)
    pair.clock.advance(0)
    assert read_to_close(pair) == big


def test_nothing_is_written_after_write_and_close(pair) -> None:
    """A write after ``write_and_close`` is dropped: nothing follows the close_notify."""
    write_and_close(pair.tls, b"221 bye\r\n")
    pair.tls.write(b"late\r\n")
    pair.clock.advance(0)
    assert read_to_close(pair) == b"221 bye\r\n"


def test_write_and_close_during_the_handshake_is_left_to_twisted(pki) -> None:
    """Closing with a last reply before the handshake is done: no record, no crash; after the handshake
    the client reads the reply and the close."""
    server_options, _ = pki.twisted_contexts()
    factory = TLSMemoryBIOFactory(server_options, False, protocol.Factory.forProtocol(Collect), clock=Clock())
    tls = factory.buildProtocol(("127.0.0.1", 1))
    lower = Lower()
    tls.makeConnection(lower)
    write_and_close(tls, b"421 too slow\r\n")
    assert not lower.out and not lower.closed  # nothing to encrypt with yet
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(20):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            incoming.write(b"".join(lower.out))
            lower.out.clear()
            if sent := outgoing.read():
                tls.dataReceived(sent)
    if sent := outgoing.read():
        tls.dataReceived(sent)
    incoming.write(b"".join(lower.out))
    got = b""
    while piece := client.read(1 << 16):  # b"" at the close_notify
        got += piece
    assert got == b"421 too slow\r\n"
