"""Finding 2, POP3 side: pipelined UIDL on a big mailbox from a client that
does not read is produced only as fast as the client reads."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.test_pop3_protocol import Client, Env, env  # noqa: F401 - env is a fixture

TCP_BUFFER = 64 * 1024  # where Twisted's TCP transport pauses its producer


class SlowReaderTransport(StringTransport):
    """Pauses its streaming producer once more than TCP_BUFFER is unread, as TCP does."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > TCP_BUFFER:
            self.producer.pauseProducing()

    def read(self) -> bytes:
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def test_pipelined_uidl_on_a_big_mailbox_waits_for_the_reader(env: Env) -> None:  # noqa: F811
    """300 UIDLs of 5,000 messages: the unread output never passes the buffer by
    more than one chunk, and every answer arrives whole once the client reads."""
    for n in range(5000):
        env.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % n)
    session: Any = env.factory().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = SlowReaderTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    session.makeConnection(transport)
    client = Client(session, transport)
    client.take()
    client.login()
    session.dataReceived(b"UIDL\r\n" * 300 + b"QUIT\r\n")
    peak, received = 0, []
    for _ in range(100_000):
        peak = max(peak, len(transport.value()))
        chunk = transport.read()
        if not chunk:
            break
        received.append(chunk)
    assert peak <= TCP_BUFFER + 80 * 1024, f"{peak} octets queued for a client that does not read"
    answers = b"".join(received)
    assert answers.count(b"+OK Unique-id listing follows\r\n") == 300
    assert answers.count(b"\r\n.\r\n") == 300 and answers.endswith(b"closing connection, 0 messages deleted\r\n")
