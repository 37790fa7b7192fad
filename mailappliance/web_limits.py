"""Bounds for the HTTP listeners (autoconfig, autoconfigs, metrics): what one
client, or all of them together, may hold.

twisted.web alone keeps any number of connections open for as long as a byte
trickles in now and then, and spools request bodies over 100 KB to a temp
file before any resource sees them. :class:`LimitedSite` is a drop-in
``Site`` that adds:

- a concurrent-connection cap per client address and one for the listener;
  a connection over either gets ``503`` and is closed at once;
- a header deadline (request line and headers complete within N seconds of
  the connection opening, or of the previous response) and a body deadline
  (the body complete within N seconds of the headers), else ``408`` and close;
- a short idle timeout (twisted.web's own ``timeOut``);
- a body limit enforced while reading: a ``Content-Length`` over it gets
  ``413`` before a byte of the body is read, a chunked body is cut off with
  ``413`` as soon as it passes it; bodies live in memory, never on disk.

Every refusal is logged with the client and the reason, and counted in
``mailappliance_http_refused_total{listener, reason}``.
"""

from __future__ import annotations

from io import BytesIO
from typing import Protocol, cast

import attrs
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from mailappliance.metrics import METRICS
from mailappliance.sessions import client_host

log = Logger()

MAX_REQUEST_BODY = 64 * 1024


@attrs.frozen
class HttpLimits:
    """The bounds of one HTTP listener; seconds are on the site's clock."""

    concurrent_per_address: int = 8
    max_connections: int = 128  # this listener
    header_timeout: float = 10.0  # request line + headers, from connect or from the previous response
    body_timeout: float = 30.0  # the whole body, from the end of the headers
    idle_timeout: float = 10.0  # no byte at all for this long (twisted.web's timeOut)
    abort_timeout: float = 5.0  # after a close we asked for, abort if the client still holds on
    max_body: int = MAX_REQUEST_BODY


class ConnectionCounter:
    """Open connections of one listener, per client address and in total."""

    def __init__(self, concurrent_per_address: int, max_connections: int) -> None:
        self.concurrent_per_address = concurrent_per_address
        self.max_connections = max_connections
        self._open: dict[str, int] = {}
        self.open_total = 0

    def admit(self, address: str) -> str | None:
        """Count a new connection, or name the cap it would break (it is then not counted)."""
        if self.open_total >= self.max_connections:
            return "max_connections"
        if self._open.get(address, 0) >= self.concurrent_per_address:
            return "concurrent_per_address"
        self._open[address] = self._open.get(address, 0) + 1
        self.open_total += 1
        return None

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
        self.open_total = max(0, self.open_total - 1)

    def open_from(self, address: str) -> int:
        return self._open.get(address, 0)


class _Closable(Protocol):
    disconnecting: bool  # set by loseConnection (TCP and TLS transports; ITransport does not declare it)


def _status_only(status: bytes) -> bytes:
    """A complete response with no body that ends the connection."""
    return b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class LimitedRequest(server.Request):
    """A request whose body stays in memory and may not pass the channel's ``max_body``."""

    channel: LimitedHTTPChannel  # LimitedSite pairs this request with that channel (None once it is gone)

    def gotLength(self, length: int | None) -> None:
        # The channel has already refused a Content-Length over the limit, and
        # chunked bodies are counted below: memory is always enough (twisted.web
        # would open a temp file for anything over 100 KB or of unknown length).
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or channel.dropped:
            return
        assert self.content is not None  # gotLength came first
        if self.content.tell() + len(data) > channel.limits.max_body:
            channel.drop(b"413 Payload Too Large", "body_too_large")
            return
        self.content.write(data)


class LimitedHTTPChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that counts itself against its site's caps and keeps
    the header and body deadlines; its ``factory`` is a :class:`LimitedSite`."""

    factory: LimitedSite
    dropped = False
    _admitted = False
    _client = "-"
    _deadline: IDelayedCall | None = None
    # set by HTTPChannel.connectionMade, which a refused connection skips: None tells connectionLost
    _networkProducer: IPushProducer | None = None  # type: ignore[assignment]

    @property
    def limits(self) -> HttpLimits:
        return self.factory.limits

    def connectionMade(self) -> None:
        # HTTPChannel's default (15) makes mypy infer int; callLater takes any number of seconds
        self.abortTimeout = self.limits.abort_timeout  # type: ignore[assignment]
        transport = self.transport
        assert transport is not None  # connected
        self._client = client_host(transport.getPeer(), "-")  # IPv4-mapped IPv6 -> IPv4
        refused = self.factory.connections.admit(self._client)
        if refused is not None:
            self.dropped = True
            self.factory.refused(self._client, refused)
            if ISSLTransport.providedBy(transport):
                # no TLS handshake for a connection we will not serve (a TLS transport is a TCP one too)
                cast(ITCPTransport, transport).abortConnection()
            else:
                transport.write(_status_only(b"503 Service Unavailable"))
                transport.loseConnection()
            return
        self._admitted = True
        super().connectionMade()  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated
        self._arm(self.limits.header_timeout, "header_timeout")

    def dataReceived(self, data: bytes) -> None:
        if not self.dropped:
            super().dataReceived(data)  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated

    def lineReceived(self, line: bytes) -> None:
        if not self.dropped:
            super().lineReceived(line)  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated

    def rawDataReceived(self, data: bytes) -> None:
        if not self.dropped:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm()
        if self.length is not None and self.length > self.limits.max_body:
            self.drop(b"413 Payload Too Large", "content_length_too_large")
            return
        super().allHeadersReceived()  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated
        if self.length != 0 and not self.dropped:
            self._arm(self.limits.body_timeout, "body_timeout")

    def allContentReceived(self) -> None:
        if self.dropped:
            return
        self._disarm()
        super().allContentReceived()  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated

    def requestDone(self, request: http.Request) -> None:
        if self.persistent and not self.dropped:
            self._arm(self.limits.header_timeout, "header_timeout")  # before: the next pipelined request may run now
        super().requestDone(request)  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self.factory.connections.release(self._client)
        if self._networkProducer is None:  # refused at connect: HTTPChannel was never set up
            self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
            return
        super().connectionLost(reason)  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated

    def drop(self, status: bytes, reason: str) -> None:
        """Answer ``status`` (if nothing was answered yet on this connection) and close it."""
        if self.dropped:
            return
        self.dropped = True
        self._disarm()
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
        self.factory.refused(self._client, reason)
        transport = self.transport
        assert transport is not None  # drop() runs on a connection, before connectionLost
        if not cast(_Closable, transport).disconnecting:
            if not self._handlingRequest:
                transport.write(_status_only(status))
            self.loseConnection()  # type: ignore[no-untyped-call]  # HTTPChannel is unannotated
        if self._abortingCall is None:
            self._abortingCall = self.callLater(  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
                self.abortTimeout, self.forceAbortClient)

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self._deadline = self.callLater(  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
            seconds, lambda: self.drop(b"408 Request Timeout", reason))

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None


class LimitedSite(server.Site):
    """A ``Site`` whose connections are :class:`LimitedHTTPChannel` under ``limits``;
    ``clock`` (a reactor, or a ``Clock`` in tests) runs every timer."""

    # HTTPFactory types ``protocol`` as its HTTP/2-capable wrapper's factory; any HTTPChannel
    # serves (buildProtocol only sets callLater and timeOut, which it has too).
    protocol = LimitedHTTPChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def __init__(self, resource: IResource, limits: HttpLimits | None = None, clock: IReactorTime | None = None,
                 name: str = "http") -> None:
        limits = limits or HttpLimits()
        super().__init__(resource, timeout=limits.idle_timeout,  # type: ignore[no-untyped-call]  # Site is unannotated
                         reactor=clock, parsePOSTFormSubmission=False)
        self.limits = limits
        self.name = name
        self.connections = ConnectionCounter(limits.concurrent_per_address, limits.max_connections)

    def refused(self, client: str, reason: str) -> None:
        METRICS.count("mailappliance_http_refused_total", listener=self.name, reason=reason)
        log.info("http {listener} refused client=[{client}] reason={reason}",
                 listener=self.name, client=client, reason=reason)
