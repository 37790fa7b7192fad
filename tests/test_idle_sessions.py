"""The session kernel while a connection is idle: its idle timeout on the
injected clock (one shared sweeper, no timer per session) and what an idle
session costs in memory (docs/performance.md, "Idle connections")."""

from __future__ import annotations

import gc
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance import sessions
from mailappliance.linesession import LineSession, idle_sweeper
from mailappliance.pop3 import server as pop3_server
from mailappliance.pop3.server import POP3Factory, POP3Session
from mailappliance.smtp import replies
from mailappliance.smtp.server import SMTPConfig, SMTPFactory, SMTPSession

# What one idle SMTP session (after its greeting) may allocate in Python
# objects, its transport not counted.  Measured 488-505 bytes on Python 3.11
# (the id's number is a new int once past 256); 2,600 before the session had
# __slots__ and shared one idle sweeper, 696-704 before the sweeper held the
# sessions themselves, the id was kept as a number and the input buffer was
# made with the first bytes.
IDLE_SESSION_BOUND = 540
# The same for an idle POP3 session (before login).  Measured 417 bytes (612
# with a per-session dict of its own eight attributes, before __slots__).
IDLE_POP3_SESSION_BOUND = 460


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


def pop3_factory(tmp_path: Path, clock: Clock) -> POP3Factory:
    """A POP3 listener whose logins are never reached (idle sessions only)."""
    return POP3Factory(Portal(cast(IRealm, object())), "pop.example.org", allow_plaintext_auth=False, reactor=clock)


def allocated_per_session(connect_one: Callable[[IdleTransport], LineSession], count: int = 400) -> tuple[float, str]:
    """Bytes Python allocates per idle session (tracemalloc, after a first session made the caches), and where."""
    connect_one(IdleTransport("198.51.100.1"))
    transports = [IdleTransport(f"10.0.{i // 250}.{i % 250}") for i in range(count)]
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        made = [connect_one(t) for t in transports]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(made) == count and all(not s.closed for s in made)
    stats = after.compare_to(before, "lineno")
    where = "\n".join(f"  {stat.size_diff / count:7.1f} B  {stat.traceback[0]}" for stat in stats[:8])
    return sum(stat.size_diff for stat in stats) / count, where


def test_idle_session_allocation_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle SMTP session, greeted and waiting, allocates at most IDLE_SESSION_BOUND bytes (tracemalloc)."""
    # Log events are emitted and dropped, as in the daemon (without a log
    # observer, Twisted keeps every event of a test run in memory).
    monkeypatch.setattr(SMTPSession, "log", Logger(namespace="mailappliance.smtp", observer=lambda event: None))
    smtp = factory(tmp_path, Clock())
    each, where = allocated_per_session(lambda transport: connect(smtp, transport))
    assert each <= IDLE_SESSION_BOUND, (
        f"an idle SMTP session now allocates {each:.0f} bytes, over the bound of {IDLE_SESSION_BOUND} "
        f"(docs/performance.md, 'Idle connections': slots, no timer per session, lazy transaction state); "
        f"largest allocations per session:\n{where}")


def test_idle_pop3_session_allocation_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle POP3 session, greeted and waiting for USER, allocates at most IDLE_POP3_SESSION_BOUND bytes."""
    quiet = Logger(namespace="mailappliance.pop3", observer=lambda event: None)
    monkeypatch.setattr(POP3Session, "log", quiet)
    monkeypatch.setattr(pop3_server, "log", quiet)  # the module's own, which its handlers use
    pop3 = pop3_factory(tmp_path, Clock())

    def connect_pop3(transport: IdleTransport) -> LineSession:
        session = pop3.buildProtocol(transport.peer)
        session.makeConnection(transport)  # type: ignore[no-untyped-call]  # BaseProtocol is unannotated
        return session

    each, where = allocated_per_session(connect_pop3)
    assert each <= IDLE_POP3_SESSION_BOUND, (
        f"an idle POP3 session now allocates {each:.0f} bytes, over the bound of {IDLE_POP3_SESSION_BOUND}; "
        f"largest allocations per session:\n{where}")


def test_idle_pop3_session_keeps_no_instance_dict(tmp_path: Path) -> None:
    """Every attribute of a POP3 session is a slot, after a command as well."""
    session = pop3_factory(tmp_path, Clock()).buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    session.makeConnection(IdleTransport("192.0.2.7"))  # type: ignore[no-untyped-call]
    session.dataReceived(b"CAPA\r\nNOOP\r\n")
    assert vars(session) == {}


def test_session_id_keeps_its_format(tmp_path: Path) -> None:
    """The id in log lines is still the process prefix and six or more hex digits, one per session, stable."""
    smtp = factory(tmp_path, Clock())
    first, second = (connect(smtp, IdleTransport(f"192.0.2.{i}")) for i in (7, 8))
    assert re.fullmatch(r"[0-9a-f]{6}[0-9a-f]{6,}", first.session_id)
    assert first.session_id.startswith(sessions._prefix) and first.session_id == first.session_id
    assert first.session_id != second.session_id


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
