"""What every session shares: an id for its log lines, no Nagle delay, and
replies that go out at once."""

from __future__ import annotations

import ipaddress
import itertools
import os
from typing import Any, cast

from twisted.internet import abstract, tcp
from twisted.internet.interfaces import IAddress, ITCPTransport, ITransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from mailappliance.tls_records import installed_records, read_records_directly, write_records_directly

_counter = itertools.count(1)
_prefix = os.urandom(3).hex()


def new_session_id() -> str:
    """A short id, unique within this process and unlikely to repeat across restarts."""
    return format_session_id(new_session_serial())


def new_session_serial() -> int:
    """The number of a new session id (a session keeps this, not the text: see ``format_session_id``)."""
    return next(_counter)


def format_session_id(serial: int) -> str:
    """The id of ``serial`` as log lines show it: the process's random prefix, then six or more hex digits."""
    return f"{_prefix}{serial:06x}"


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
    anything written while other data is buffered, or a transport of another
    kind, goes through ``transport.write`` as usual, so order, flow control
    and error handling stay Twisted's.  On TLS (implicit, or after STARTTLS)
    the reply goes through Twisted's TLS layer as usual (which gathers the
    writes of one reactor pass into one record) and the encrypted bytes take
    the same shortcut to the socket (:func:`send_tls_directly`).
    """
    if type(transport) is tcp.Server and not transport.TLS:
        if _send_at_once(transport, data):
            return
    elif not getattr(transport, "_sends_directly", False):
        send_tls_directly(transport)
    transport.write(data)


def write_and_close(transport: ITransport, data: bytes) -> None:
    """``write_now(transport, data)``, then close: on TLS the session stops being the
    transport's producer (Twisted's TLS ``loseConnection`` waits for that before its
    close_notify, so a session that said 221 never closed) and the connection
    ends after ``data``.  On TLS with our record paths the last reply's record waits
    for the close_notify and both leave in one send; then the TCP connection closes
    too, without waiting for the client's close_notify (a one-sided TLS close, as
    Postfix does), so a client that stays after QUIT holds no session."""
    tls: Any = transport  # implicit TLS: the session's transport is the TLS protocol
    if type(transport) is tcp.Server and transport.TLS:  # after STARTTLS
        tls = transport.protocol
    records = None
    if isinstance(tls, TLSMemoryBIOProtocol):
        tls.unregisterProducer()  # the TLS layer's (plain TCP closes with its producer registered)
        records = installed_records(tls)
    held = records is not None and records.write_last(data)
    if data and not held:
        write_now(transport, data)
    transport.loseConnection()
    if isinstance(tls, TLSMemoryBIOProtocol):
        if records is not None:
            records.flush()  # normally the close_notify took the last record along already
        lower = tls.transport  # the TCP connection beneath (after STARTTLS: Twisted's bypass)
        if lower is not None and tls._handshakeDone and tls.disconnecting and not tls._appSendBuffer:
            lower.loseConnection()  # after what it holds, the close_notify included (a handshake
            # still under way is Twisted's to end: it aborts, or closes once the handshake is done)


def _send_at_once(connection: tcp.Server, data: bytes) -> bool:
    """Put ``data`` on the socket if nothing is waiting before it and the socket
    takes all of it; False (nothing sent) otherwise."""
    if connection.connected and not connection.disconnecting and not connection._writeDisconnected \
            and not connection.dataBuffer and not connection._tempDataBuffer:
        try:
            sent = connection.socket.send(data)
        except OSError:  # would block, or a broken connection that the reactor will report
            sent = 0
        if sent == len(data):
            return True
        if sent:
            abstract.FileDescriptor.write(connection, data[sent:])
            return True
    return False


# A record this big carries a full 16 KiB of data: bulk output (a POP3 RETR) follows, which
# Twisted's buffer sends up to 128 KiB at a time; one system call per record would be more.
FULL_TLS_RECORD = 16 * 1024


def write_records_at_once(tls: TLSMemoryBIOProtocol) -> None:
    """Make each write to ``tls`` a record at once, instead of Twisted's gathering
    of one reactor pass's writes into one record (``BufferingTLSTransport``).

    Our sessions already write once per batch of replies (``linesession.send``
    holds the replies to a pipeline), so the gathering only added a timed call
    per flush (a ``DelayedCall``, the timer heap, ``runUntilCurrent``) and held
    every reply back until the reactor had read every other ready connection.
    Anything the gatherer holds goes first; after ``connectionLost`` Twisted
    puts its own no-op writer back."""
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is None or vars(tls).get("write") != aggregator.write:
        return  # not Twisted's gathering layer (another Twisted), or already direct
    aggregator.flush()
    tls.write = write_records_directly(tls)  # type: ignore[method-assign]


def send_tls_directly(transport: object) -> None:
    """Let a TLS connection's encrypted output skip Twisted's per-write buffering
    pass on the TCP connection beneath: when nothing is waiting there, the bytes
    go to the socket at once (no write-interest toggle, two ``epoll_ctl`` calls
    and a reactor pass less per flush), otherwise they are buffered as before, and
    so are full records (bulk output).  Once per connection; anything not TLS over
    ``tcp.Server`` is left alone."""
    tls: object = transport  # implicit TLS: the session's transport is the TLS protocol itself
    connection: object = getattr(transport, "transport", None)
    if type(transport) is tcp.Server and transport.TLS:  # after STARTTLS
        connection, tls = transport, getattr(transport, "protocol", None)
    lower: Any = getattr(tls, "transport", None)  # what the TLS layer writes its records to
    if not isinstance(tls, TLSMemoryBIOProtocol) or type(connection) is not tcp.Server or lower is None \
            or (lower is connection and connection.TLS):
        return

    def write(data: bytes) -> None:
        if len(data) >= FULL_TLS_RECORD or not _send_at_once(connection, data):
            abstract.FileDescriptor.write(connection, data)

    lower.write = write  # the TLS layer's own writes (records, handshake flights, close_notify)
    write_records_at_once(tls)
    read_records_directly(tls)
    marked: Any = transport
    marked._sends_directly = True  # once per connection
