"""The session kernel while a connection is idle: its idle timeout on the
injected clock (one shared sweeper, no timer per session) and what an idle
session costs in memory (docs/performance.md, "Idle connections")."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.linesession import idle_sweeper
from mailappliance.smtp import replies
from mailappliance.smtp.server import SMTPConfig, SMTPFactory, SMTPSession

# What one idle SMTP session (after its greeting) may allocate in Python
# objects, its transport not counted.  Measured 696 bytes on Python 3.11
# (2,600 before the session had __slots__ and shared one idle sweeper).
IDLE_SESSION_BOUND = 800


class IdleTransport:
    """The least a session needs from a connection, small and made before measuring."""

    __slots__ = ("peer", "producer", "written", "disconnecting", "aborted")

    def __init__(self, host: str) -> None:
        self.peer = IPv4Address("TCP", host, 40000)
        self.producer: object = None
        self.written = 0
        self.disconnecting = False
        self.aborted = False

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.1", 25)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def write(self, data: bytes) -> None:
        self.written += len(data)  # counted, not kept: the replies are not the session's memory

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.disconnecting = self.aborted = True


def factory(tmp_path: Path, clock: Clock, idle_timeout: float = 300) -> SMTPFactory:
    config = SMTPConfig(hostname="mx.example.org", role="mx", local_domains=frozenset({"example.org"}),
                        maildir_root=tmp_path / "mail", incoming_dir=tmp_path / "incoming",
                        max_message_size=10_000, idle_timeout=idle_timeout)
    return SMTPFactory(config, lambda address: succeed(None), lambda job: succeed([]), clock=clock)


def connect(factory: SMTPFactory, transport: IdleTransport) -> SMTPSession:
    session = factory.buildProtocol(None)
    session.makeConnection(transport)
    return session


def test_idle_session_allocation_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle SMTP session, greeted and waiting, allocates at most IDLE_SESSION_BOUND bytes (tracemalloc)."""
    # Log events are emitted and dropped, as in the daemon (without a log
    # observer, Twisted keeps every event of a test run in memory).
    monkeypatch.setattr(SMTPSession, "log", Logger(namespace="mailappliance.smtp", observer=lambda event: None))
    clock = Clock()
    smtp = factory(tmp_path, clock)
    connect(smtp, IdleTransport("198.51.100.1"))  # first use: caches, the sweeper, metrics
    count = 400
    transports = [IdleTransport(f"10.0.{i // 250}.{i % 250}") for i in range(count)]
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        sessions = [connect(smtp, t) for t in transports]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    stats = after.compare_to(before, "lineno")
    each = sum(stat.size_diff for stat in stats) / count
    where = "\n".join(f"  {stat.size_diff / count:7.1f} B  {stat.traceback[0]}" for stat in stats[:8])
    assert len(sessions) == count and all(not s.closed for s in sessions)
    assert each <= IDLE_SESSION_BOUND, (
        f"an idle SMTP session now allocates {each:.0f} bytes, over the bound of {IDLE_SESSION_BOUND} "
        f"(docs/performance.md, 'Idle connections': slots, no timer per session, lazy transaction state); "
        f"largest allocations per session:\n{where}")


def test_idle_session_keeps_no_instance_dict(tmp_path: Path) -> None:
    """Every attribute of an idle SMTP session is a slot (a new one, or a class default shadowing one, shows here)."""
    session = connect(factory(tmp_path, Clock()), IdleTransport("192.0.2.7"))
    session.dataReceived(b"EHLO client.example.net\r\nNOOP\r\n")
    assert vars(session) == {}


def test_idle_timeout_fires_exactly_at_the_deadline_and_moves_with_activity(tmp_path: Path) -> None:
    """The idle timeout fires on the injected clock at last activity + idle_timeout, not a moment before."""
    clock = Clock()
    transport = IdleTransport("192.0.2.7")
    session = connect(factory(tmp_path, clock, idle_timeout=100), transport)
    clock.advance(60)
    session.dataReceived(b"NOOP\r\n")  # the deadline is now 160
    clock.advance(99.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and not transport.aborted  # a 421 goodbye, then closed


def test_idle_timeout_says_421_before_closing(tmp_path: Path) -> None:
    """An idle client gets 421 4.4.2 and the connection is closed, not aborted."""
    clock = Clock()
    transport = IdleTransport("192.0.2.7")
    session = connect(factory(tmp_path, clock, idle_timeout=30), transport)
    sent: list[bytes] = []
    session.send = sent.append  # type: ignore[method-assign]  # see the bytes
    clock.advance(30)
    assert sent and sent[-1].startswith(f"{replies.TIMEOUT.code} {replies.TIMEOUT.status} ".encode())
    assert transport.disconnecting and not transport.aborted


def test_sessions_share_one_timer(tmp_path: Path) -> None:
    """Many idle sessions on one clock have one pending timer between them, and each still times out on time."""
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=50)
    transports = [IdleTransport(f"10.0.0.{i}") for i in range(1, 101)]
    sessions = [connect(smtp, t) for t in transports]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10)
    sessions[0].dataReceived(b"NOOP\r\n")  # one of them is active: its deadline is 60
    clock.advance(40)
    assert [t.disconnecting for t in transports] == [False] + [True] * 99
    clock.advance(10)
    assert transports[0].disconnecting


def test_ended_sessions_leave_the_sweeper(tmp_path: Path) -> None:
    """A closed connection is never timed out later, and the sweeper holds no entry for it."""
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=50)
    transport = IdleTransport("192.0.2.7")
    session = connect(smtp, transport)
    sweeper = idle_sweeper(clock)
    assert len(sweeper) == 1
    session.connectionLost(Failure(ConnectionError("gone")))
    assert len(sweeper) == 0
    clock.advance(60)
    assert not transport.disconnecting


def test_a_failing_timeout_does_not_stop_the_others(tmp_path: Path) -> None:
    """An exception while one session times out is logged, and the sessions due with it still time out."""
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=50)
    broken, healthy = IdleTransport("192.0.2.7"), IdleTransport("192.0.2.8")
    first = connect(smtp, broken)
    connect(smtp, healthy)

    def fails(why: str) -> None:
        raise RuntimeError("a bug in say_timeout")

    first.say_timeout = fails  # type: ignore[method-assign]
    clock.advance(50)
    assert healthy.disconnecting
