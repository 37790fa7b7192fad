"""Our outbound ESMTP client on an in-memory transport: a test plays the remote
server line by line and reads what the client answers."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport

from mailappliance.queue.client import OutboundFactory, OutboundJob


class OutboundScript:
    """One outbound transaction for ``job``; ``results`` gets what ``finished`` fires with."""

    def __init__(self, job: OutboundJob) -> None:
        self.factory = OutboundFactory(job)
        self.results: list[Any] = []
        self.factory.finished.addCallback(self.results.append)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, line: bytes) -> bytes:
        """The remote server sends ``line``; what the client writes back."""
        self.transport.clear()
        self.protocol.dataReceived(line)
        return self.transport.value()
