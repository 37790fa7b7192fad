"""Replies handed to the socket at once (``write_now``) on a real TCP transport:
nothing buffered goes out directly; anything else keeps Twisted's order."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from mailappliance.sessions import write_now


@pytest.fixture
def connection() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1234), None, 1, reactor)  # type: ignore[arg-type]
    yield transport, peer, reactor
    ours.close()
    peer.close()


def received(peer: socket.socket, at_least: int = 0) -> bytes:
    """What the peer has received (decrypted, for a TLS socket); waits (up to 5 s) for
    ``at_least`` bytes: loopback delivery can lag the server's send on a loaded machine."""
    peer.setblocking(False)
    data = b""
    deadline = time.monotonic() + 5
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except (BlockingIOError, ssl.SSLWantReadError):
            if len(data) >= at_least or not select.select([peer], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return data
            continue
        if not chunk:
            return data
        data += chunk


def test_with_nothing_buffered_the_reply_is_on_the_wire_without_the_reactor(connection) -> None:
    """With nothing buffered, write_now puts the reply on the socket at once, leaving no write interest."""
    transport, peer, reactor = connection
    write_now(transport, b"250 2.0.0 Ok\r\n")
    assert received(peer, len(b"250 2.0.0 Ok\r\n")) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.writers  # no write interest, no buffered bytes
    assert not transport._tempDataBuffer and not transport.dataBuffer


def test_behind_buffered_data_a_reply_waits_its_turn(connection) -> None:
    """Behind buffered data a reply is buffered too and goes out after it, in order."""
    transport, peer, reactor = connection
    transport.write(b"first\r\n")  # buffered until the reactor writes
    write_now(transport, b"second\r\n")
    assert received(peer) == b""
    transport.doWrite()
    assert received(peer, len(b"first\r\nsecond\r\n")) == b"first\r\nsecond\r\n"


def test_what_the_socket_does_not_take_is_buffered_in_order(connection) -> None:
    """What the socket does not take at once is buffered, and later replies follow it in order."""
    transport, peer, reactor = connection
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once
    write_now(transport, big)
    write_now(transport, b"tail")
    assert transport in reactor.writers
    got = b""
    while len(got) < len(big) + 4:
        got += received(peer)
        transport.doWrite()
    assert got == big + b"tail"


def test_other_transports_get_an_ordinary_write() -> None:
    """A transport that is not a TCP socket gets an ordinary write."""
    transport = StringTransport()
    write_now(transport, b"+OK\r\n")
    assert transport.value() == b"+OK\r\n"


def test_a_closing_connection_is_left_to_twisted(connection) -> None:
    """On a closing connection write_now leaves the bytes to Twisted instead of the socket."""
    transport, peer, reactor = connection
    transport.loseConnection()
    write_now(transport, b"421 bye\r\n")
    assert received(peer) == b""  # Twisted decides what still goes out while closing


def _tls_pump(connection: tcp.Server, reactor: MemoryReactor, client: ssl.SSLSocket, clock: Clock | None) -> None:
    """One turn of a reactor that is not running: flush the TLS layer, read what came, write what waits."""
    if clock is not None:
        clock.advance(0)
    connection.doRead()
    if connection in reactor.writers:
        connection.doWrite()


def _handshake(connection: tcp.Server, reactor: MemoryReactor, client: ssl.SSLSocket, clock: Clock | None) -> None:
    for _ in range(100):
        try:
            client.do_handshake()
            return
        except ssl.SSLWantReadError:
            _tls_pump(connection, reactor, client, clock)
    raise AssertionError("no TLS handshake")


@pytest.fixture
def tls_connection(pki) -> Iterator[tuple[TLSMemoryBIOProtocol, tcp.Server, ssl.SSLSocket, MemoryReactor, Clock]]:
    """An implicit-TLS server connection (port 465 style) on a real socket, handshake done."""
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reactor, clock = MemoryReactor(), Clock()
    server_options, _ = pki.twisted_contexts()
    factory = TLSMemoryBIOFactory(server_options, False, protocol.Factory.forProtocol(protocol.Protocol), clock=clock)
    tls = factory.buildProtocol(("127.0.0.1", 1234))
    connection = tcp.Server(ours, tls, ("127.0.0.1", 1234), None, 1, reactor)  # type: ignore[arg-type]
    tls.makeConnection(connection)
    client = pki.client_context().wrap_socket(peer, server_hostname="localhost", do_handshake_on_connect=False)
    client.setblocking(False)
    _handshake(connection, reactor, client, clock)
    _tls_pump(connection, reactor, client, clock)  # the client's Finished; the server's session tickets
    received(client)
    yield tls, connection, client, reactor, clock
    client.close()
    ours.close()


def test_tls_records_go_to_the_socket_without_the_reactor(tls_connection) -> None:
    """On implicit TLS a reply's record is on the wire after the TLS layer's flush, with no write interest left."""
    tls, connection, client, reactor, clock = tls_connection
    write_now(tls, b"250 2.0.0 Ok\r\n")
    write_now(tls, b"250 2.1.5 Ok\r\n")
    clock.advance(0)  # Twisted's TLS layer gathers one pass's writes into one record
    assert connection not in reactor.writers and not connection._tempDataBuffer and not connection.dataBuffer
    assert received(client, len(b"250 2.0.0 Ok\r\n250 2.1.5 Ok\r\n")) == b"250 2.0.0 Ok\r\n250 2.1.5 Ok\r\n"


def test_tls_reply_is_a_record_on_the_wire_without_waiting_for_the_reactor(tls_connection) -> None:
    """A reply written on TLS is encrypted and sent at once, not held for the reactor's next pass."""
    tls, connection, client, reactor, clock = tls_connection
    write_now(tls, b"250 2.0.0 Ok\r\n")
    assert not clock.getDelayedCalls()  # no timed flush of Twisted's write gatherer
    assert received(client, len(b"250 2.0.0 Ok\r\n")) == b"250 2.0.0 Ok\r\n"
    write_now(tls, b"250 2.1.5 Ok\r\n")
    assert received(client, len(b"250 2.1.5 Ok\r\n")) == b"250 2.1.5 Ok\r\n"


def test_tls_records_the_socket_does_not_take_stay_in_order(tls_connection) -> None:
    """What the socket does not take at once is buffered, and later records follow it in order."""
    tls, connection, client, reactor, clock = tls_connection
    connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket takes at once
    write_now(tls, big)
    clock.advance(0)
    write_now(tls, b"tail")
    clock.advance(0)
    assert connection in reactor.writers
    got = b""
    for _ in range(10000):
        if len(got) >= len(big) + 4:
            break
        got += received(client)
        _tls_pump(connection, reactor, client, clock)
    assert got == big + b"tail"


def test_bulk_tls_output_is_sent_by_the_reactor_in_large_writes(tls_connection) -> None:
    """Full records (a POP3 RETR over TLS) are buffered and sent together, not one system call each."""
    tls, connection, client, reactor, clock = tls_connection
    bulk = b"x" * (64 * 1024)
    write_now(tls, bulk)
    clock.advance(0)
    assert connection in reactor.writers and connection._tempDataLen > 4 * 16 * 1024
    connection.doWrite()
    assert received(client, len(bulk)) == bulk


def test_after_starttls_records_go_to_the_socket_at_once(connection, pki) -> None:
    """After STARTTLS on a TCP connection, replies' records go to the socket without the reactor too."""
    transport, peer, reactor = connection
    transport.protocol.makeConnection(transport)
    server_options, _ = pki.twisted_contexts()
    transport.startTLS(server_options)
    client = pki.client_context().wrap_socket(peer, server_hostname="localhost", do_handshake_on_connect=False)
    client.setblocking(False)
    _handshake(transport, reactor, client, None)
    tls = transport.protocol
    flush = tls._aggregator.flush  # the TLS layer's per-pass flush (the global reactor is not running here)
    flush()
    _tls_pump(transport, reactor, client, None)
    received(client)
    write_now(transport, b"250 2.0.0 Ok\r\n")
    flush()
    assert transport not in reactor.writers and not transport._tempDataBuffer and not transport.dataBuffer
    assert received(client, len(b"250 2.0.0 Ok\r\n")) == b"250 2.0.0 Ok\r\n"
