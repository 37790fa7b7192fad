"""Replies handed to the socket at once (``write_now``) on a real TCP transport:
nothing buffered goes out directly; anything else keeps Twisted's order."""

from __future__ import annotations

import socket
from typing import Iterator

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

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


def received(peer: socket.socket) -> bytes:
    peer.setblocking(False)
    data = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_with_nothing_buffered_the_reply_is_on_the_wire_without_the_reactor(connection) -> None:
    """With nothing buffered, write_now puts the reply on the socket at once, leaving no write interest."""
    transport, peer, reactor = connection
    write_now(transport, b"250 2.0.0 Ok\r\n")
    assert received(peer) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.writers  # no write interest, no buffered bytes
    assert not transport._tempDataBuffer and not transport.dataBuffer


def test_behind_buffered_data_a_reply_waits_its_turn(connection) -> None:
    """Behind buffered data a reply is buffered too and goes out after it, in order."""
    transport, peer, reactor = connection
    transport.write(b"first\r\n")  # buffered until the reactor writes
    write_now(transport, b"second\r\n")
    assert received(peer) == b""
    transport.doWrite()
    assert received(peer) == b"first\r\nsecond\r\n"


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
