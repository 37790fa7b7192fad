"""What every session shares: an id for its log lines, no Nagle delay, and
replies that go out at once."""

from __future__ import annotations

import ipaddress
import itertools
import os
from typing import cast

from twisted.internet import tcp
from twisted.internet.interfaces import IAddress, ITCPTransport, ITransport

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """A short id, unique within this process and unlikely to repeat across restarts."""
    return f"{_prefix}{next(_counter):06x}"


def client_host(peer: IAddress, default: str = "unknown") -> str:
    """The client's address as every policy sees it: an IPv4 client of a dual-stack
    ("::") listener arrives as ``::ffff:192.0.2.7`` and is ``192.0.2.7`` here, so
    screening networks, limits, budgets and Received fields treat it as IPv4."""
    host = getattr(peer, "host", None)
    if not isinstance(host, str) or not host:
        return default
    if host.startswith("::ffff:") and "." in host:
        try:
            mapped = ipaddress.IPv6Address(host.partition("%")[0]).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


def no_delay(transport: ITransport) -> None:
    """Small replies must not wait for the client's delayed ACK (Nagle): ~40 ms per round trip."""
    try:
        cast(ITCPTransport, transport).setTcpNoDelay(True)  # TCP and TLS-over-TCP transports have it
    except (AttributeError, OSError):
        pass  # not a TCP transport (unit tests)


def write_now(transport: ITransport, data: bytes) -> None:
    """``transport.write(data)``, but on a plain TCP connection with nothing
    waiting to be sent, hand the bytes to the socket at once.

    Twisted buffers every write until the reactor's next pass and toggles
    write interest (two ``epoll_ctl`` calls and a loop pass per reply); for a
    client that waits for each reply that was 4-19 % of throughput
    (docs/performance.md).  Whatever the socket does not take at once, and
    anything written while other data is buffered, TLS, or a transport of
    another kind, goes through ``transport.write`` as usual, so order, flow
    control and error handling stay Twisted's.
    """
    if type(transport) is tcp.Server and not transport.TLS and transport.connected \
            and not transport.disconnecting and not transport.dataBuffer and not transport._tempDataBuffer:
        try:
            sent = transport.socket.send(data)
        except OSError:  # would block, or a broken connection that the reactor will report
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
