"""Idle-connection state under hostile connection patterns: connection churn
must not grow the shared idle sweeper or keep ended sessions alive, sessions
that vanish while the sweeper is timing them out must not break it for the
others, and clients from ever new addresses keep the connection rate small
and bounded."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

import mailappliance.limits as limits_module
from mailappliance.limits import RecentConnections
from mailappliance.linesession import idle_sweeper
from tests.test_idle_sessions import IdleTransport, connect, factory


def test_connection_churn_keeps_the_sweeper_bounded(tmp_path: Path) -> None:
    """20,000 connections opened and closed within one idle period leave at most a
    bounded number of dead entries, and no ended session is kept alive."""
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=300)
    sweeper = idle_sweeper(clock)
    keeper = connect(smtp, IdleTransport("192.0.2.1"))  # one long-lived idle session
    ended: list[weakref.ref[object]] = []
    for i in range(20_000):
        session = connect(smtp, IdleTransport(f"10.{i // 62500}.{i // 250 % 250}.{i % 250}"))
        session.connectionLost(Failure(ConnectionError("reset by peer")))
        if i % 1000 == 0:
            ended.append(weakref.ref(session))
        assert sweeper.entries() <= 2 * len(sweeper) + 65, "dead entries pile up in the idle sweeper"
    del session
    gc.collect()
    assert len(sweeper) == 1
    assert all(ref() is None for ref in ended), "the idle sweeper keeps ended sessions alive"
    clock.advance(300)
    assert keeper.transport.disconnecting and len(sweeper) == 0


class VanishingTransport(IdleTransport):
    """A transport that reports the connection lost at once when closed (as a reset would)."""

    __slots__ = ("session",)

    def loseConnection(self) -> None:
        super().loseConnection()
        self.session.connectionLost(Failure(ConnectionError("gone")))

    def abortConnection(self) -> None:
        super().abortConnection()
        self.session.connectionLost(Failure(ConnectionError("gone")))


def test_sessions_ending_during_a_sweep_do_not_break_it(tmp_path: Path) -> None:
    """Sessions due together whose connections end inside their own timeout are all
    timed out, once each, and leave nothing behind in the sweeper."""
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=60)
    transports = []
    for i in range(200):
        transport = VanishingTransport(f"10.0.{i // 250}.{i % 250}")
        transport.session = connect(smtp, transport)
        transports.append(transport)
    transports[7].session.connectionLost(Failure(ConnectionError("left early")))
    clock.advance(60)
    assert all(t.disconnecting for i, t in enumerate(transports) if i != 7)
    assert not transports[7].disconnecting
    assert len(idle_sweeper(clock)) == 0 and idle_sweeper(clock).entries() == 0
    assert clock.getDelayedCalls() == []


def test_connection_rate_per_address_is_small_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients from ever new addresses cost one float each in the connection rate, at most
    MAX_TRACKED of them; an address that comes back is still counted exactly."""
    monkeypatch.setattr(limits_module, "MAX_TRACKED", 1000)
    rate = RecentConnections(60)
    for i in range(5000):
        rate.add(f"10.0.{i // 250}.{i % 250}", float(i) / 100)
    assert len(rate) == 1000  # the oldest forgotten first
    assert rate.total("10.0.0.1", 50.0) == 0 and rate.total("10.0.19.249", 50.0) == 1
    for at in (100.0, 110.0, 120.0):
        rate.add("192.0.2.7", at)
    assert rate.total("192.0.2.7", 120.0) == 3
    assert rate.total("192.0.2.7", 170.5) == 1  # the first two left the minute
    assert rate.total("192.0.2.7", 181.0) == 0 and "192.0.2.7" not in rate._times
