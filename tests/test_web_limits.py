"""HTTP listener bounds without sockets: caps, deadlines and the body limit
(StringTransport for the connection, Clock for time)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource
from zope.interface import implementer

from mailappliance.config import load_config
from mailappliance.metrics import METRICS
from mailappliance.web import autoconfig_site
from mailappliance.web_limits import ConnectionCounter, HttpLimits, LimitedSite

LIMITS = HttpLimits(concurrent_per_address=2, max_connections=3, header_timeout=10, body_timeout=30,
                    idle_timeout=8, abort_timeout=5, max_body=1000)


class Echo(resource.Resource):
    """Records each request body it is given and answers with its size."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[Any] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content)
        return b"got %d" % len(request.content.read())


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """What an ``autoconfigs`` (implicit TLS) connection looks like to the channel."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Conn:
    """One client connection to a site, driven by hand."""

    def __init__(self, site: LimitedSite, host: str = "192.0.2.1", port: int = 40000, tls: bool = False) -> None:
        address = IPv4Address("TCP", host, port)
        self.protocol = site.buildProtocol(address)
        self.transport = (TLSStringTransport if tls else StringTransport)(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def reply(self) -> bytes:
        return self.transport.value()

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lost(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def site(echo: Echo, clock: Clock) -> LimitedSite:
    return LimitedSite(echo, LIMITS, clock, name="test")


def test_counter_caps_per_address_and_in_total() -> None:
    """The counter refuses the third connection of one address and the fourth overall, and forgets closed ones."""
    counter = ConnectionCounter(concurrent_per_address=2, max_connections=3)
    assert counter.admit("a") is None and counter.admit("a") is None
    assert counter.admit("a") == "concurrent_per_address"
    assert counter.admit("b") is None
    assert counter.admit("c") == "max_connections"
    counter.release("a")
    assert counter.admit("c") is None
    assert counter.open_from("a") == 1 and counter.open_total == 3


def test_connection_over_the_address_cap_gets_503_and_is_closed(site: LimitedSite) -> None:
    """A third concurrent connection from one address is answered 503 and closed at once; a freed slot is reusable."""
    before = METRICS.value("mailappliance_http_refused_total", listener="test", reason="concurrent_per_address")
    first, second = Conn(site), Conn(site)
    third = Conn(site)
    assert third.reply.startswith(b"HTTP/1.1 503 ")
    assert b"Connection: close" in third.reply
    assert third.closing and not first.closing and not second.closing
    third.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # whatever it sends is ignored
    assert third.reply.count(b"HTTP/1.1") == 1
    third.lost()
    assert METRICS.value("mailappliance_http_refused_total", listener="test",
                         reason="concurrent_per_address") == before + 1
    first.lost()
    fourth = Conn(site)
    assert not fourth.closing and fourth.reply == b""


def test_tls_connection_over_the_cap_is_aborted_without_a_handshake(site: LimitedSite) -> None:
    """Over the cap, a TLS connection is aborted at once: no 503 is queued behind a handshake the client may stall."""
    Conn(site, tls=True), Conn(site, tls=True)
    refused = Conn(site, tls=True)
    assert refused.transport.disconnected and refused.reply == b""


def test_connection_over_the_listener_cap_gets_503(site: LimitedSite) -> None:
    """Past max_connections every address is refused, whatever its own count."""
    held = [Conn(site, "192.0.2.1"), Conn(site, "192.0.2.2"), Conn(site, "192.0.2.3")]
    refused = Conn(site, "192.0.2.4")
    assert refused.reply.startswith(b"HTTP/1.1 503 ") and refused.closing
    assert not any(c.closing for c in held)
    assert site.connections.open_total == 3


def test_slow_headers_are_dropped_at_the_header_deadline(site: LimitedSite, clock: Clock) -> None:
    """A request trickling in one byte at a time (never idle) is answered 408 and closed at the header deadline."""
    conn = Conn(site)
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
        conn.send(bytes([byte]))
        clock.advance(0.3)
        if clock.seconds() >= 9.9:
            break
    assert not conn.closing
    clock.advance(10 - clock.seconds())
    assert conn.reply.startswith(b"HTTP/1.1 408 ") and conn.closing
    assert site.connections.open_total == 1  # until the connection is really gone
    conn.lost()
    assert site.connections.open_total == 0


def test_a_connection_that_sends_nothing_is_dropped(site: LimitedSite, clock: Clock) -> None:
    """Silence ends the connection at the idle timeout, and it is aborted if the client will not close."""
    conn = Conn(site)
    clock.advance(LIMITS.idle_timeout)
    assert conn.closing
    clock.advance(LIMITS.abort_timeout)
    assert conn.transport.disconnected  # abortConnection was called: the client cannot hold the socket


def test_an_unresponsive_client_is_aborted_after_the_deadline(site: LimitedSite, clock: Clock) -> None:
    """After a 408 the client gets abort_timeout seconds to go, then the connection is aborted."""
    conn = Conn(site)
    for _ in range(6):  # a byte every 2 s: never idle, never done
        conn.send(b"G")
        clock.advance(2)
    assert conn.reply.startswith(b"HTTP/1.1 408 ")
    assert not conn.transport.disconnected
    clock.advance(LIMITS.abort_timeout)
    assert conn.transport.disconnected


def test_keep_alive_gets_a_new_header_deadline_per_request(site: LimitedSite, clock: Clock) -> None:
    """On a persistent connection each request has its own header deadline, counted from the previous response."""
    conn = Conn(site)
    clock.advance(7)
    conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in conn.reply
    clock.advance(7)  # 14 s after connect, 7 s after the response
    conn.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.reply.count(b"200 OK") == 2 and not conn.closing
    clock.advance(7)
    conn.send(b"GET /c HTTP/1.1\r\n")
    clock.advance(3)
    assert conn.closing and conn.reply.endswith(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                                b"Content-Length: 0\r\n\r\n")


def test_slow_body_is_dropped_at_the_body_deadline(site: LimitedSite, clock: Clock, echo: Echo) -> None:
    """A body dripping in slower than the body deadline allows is answered 408; the resource never runs."""
    conn = Conn(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(5):
        conn.send(b"x")
        clock.advance(6)
    assert conn.reply.startswith(b"HTTP/1.1 408 ") and conn.closing
    assert echo.bodies == []


def test_a_body_in_time_is_served(site: LimitedSite, clock: Clock, echo: Echo) -> None:
    """A body that arrives within the deadline is handed over whole, in memory."""
    conn = Conn(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(4):
        clock.advance(6)
        conn.send(b"x" * 250)
    assert b"200 OK" in conn.reply and conn.reply.endswith(b"got 1000")
    assert isinstance(echo.bodies[0], BytesIO)
    for _ in range(3):  # the next request trickles in, t = 27, 30, 33 (never idle)
        clock.advance(3)
        conn.send(b"G")
        assert not conn.closing  # the body deadline (t = 30) was cancelled with the body
    clock.advance(1)  # its header deadline: 10 s after the response (t = 24)
    assert conn.closing and conn.reply.endswith(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                                                b"Content-Length: 0\r\n\r\n")


def test_content_length_over_the_limit_gets_413_before_the_body(site: LimitedSite, echo: Echo) -> None:
    """A declared body over max_body is answered 413 at the end of the headers; nothing of it is read or kept."""
    before = METRICS.value("mailappliance_http_refused_total", listener="test", reason="content_length_too_large")
    conn = Conn(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2000000000\r\n\r\n" + b"x" * 5000)
    assert conn.reply == b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert conn.closing
    conn.send(b"x" * 5000)
    assert echo.bodies == [] and conn.protocol.requests[-1].content is None
    assert METRICS.value("mailappliance_http_refused_total", listener="test",
                         reason="content_length_too_large") == before + 1


def test_chunked_body_is_cut_off_at_the_limit(site: LimitedSite, echo: Echo) -> None:
    """A chunked body is cut off with 413 as soon as it passes max_body; what was kept never passes it."""
    conn = Conn(site)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    conn.send(b"258\r\n" + b"x" * 600 + b"\r\n")
    assert conn.reply == b"" and not conn.closing
    conn.send(b"258\r\n" + b"x" * 600 + b"\r\n" + b"258\r\n" + b"x" * 600 + b"\r\n0\r\n\r\n")
    assert conn.reply.startswith(b"HTTP/1.1 413 ") and conn.closing
    assert echo.bodies == []
    kept = conn.protocol.requests[-1].content
    assert isinstance(kept, BytesIO) and kept.tell() == 600


def test_bodies_never_go_to_a_temp_file(site: LimitedSite, echo: Echo, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither a chunked body nor one of unknown length opens a temp file (twisted.web would, over 100 KB)."""
    import tempfile

    def no_temp_file(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body went to a temp file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_temp_file)
    big = LimitedSite(echo, HttpLimits(max_body=200_000), Clock())
    conn = Conn(big)
    conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"%x\r\n" % 150_000 + b"y" * 150_000 + b"\r\n0\r\n\r\n")
    conn2 = Conn(big)
    conn2.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 150000\r\n\r\n" + b"y" * 150_000)
    assert conn.reply.endswith(b"got 150000") and conn2.reply.endswith(b"got 150000")
    assert all(isinstance(body, BytesIO) for body in echo.bodies)


def test_idle_timeout_is_the_sites(site: LimitedSite) -> None:
    """twisted.web's idle timeout is the short one from the limits, not its 60 s default."""
    assert Conn(site).protocol.timeOut == LIMITS.idle_timeout


@pytest.fixture
def autoconfig(tmp_path: Path, clock: Clock) -> LimitedSite:
    config = tmp_path / "m.toml"
    config.write_text(
        '[server]\nhostname = "mx.example.org"\nlocal_domains = ["example.org"]\n'
        '[[listeners]]\nrole = "pop3s"\nport = 995\n[[listeners]]\nrole = "submissions"\nport = 465\n'
    )
    return autoconfig_site(load_config(config), clock=clock)


@pytest.mark.parametrize("path", [b"/autodiscover/autodiscover.xml", b"/Autodiscover/Autodiscover.xml",
                                  b"/AutoDiscover/AutoDiscover.xml"])
def test_autodiscover_path_is_case_insensitive(autoconfig: LimitedSite, path: bytes) -> None:
    """Outlook's /Autodiscover/Autodiscover.xml is served like the lower-case path."""
    body = (b'<?xml version="1.0"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/'
            b'outlook/requestschema/2006"><Request><EMailAddress>alice@example.org</EMailAddress>'
            b"</Request></Autodiscover>")
    conn = Conn(autoconfig)
    conn.send(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert conn.reply.startswith(b"HTTP/1.1 200 OK")
    assert b"<Port>995</Port>" in conn.reply and b"<Port>465</Port>" in conn.reply


def test_autoconfig_site_is_limited(autoconfig: LimitedSite) -> None:
    """The autoconfig listener refuses an autodiscover body over 64 KiB with 413 before reading it."""
    conn = Conn(autoconfig)
    conn.send(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n")
    assert conn.reply.startswith(b"HTTP/1.1 413 ") and conn.closing
