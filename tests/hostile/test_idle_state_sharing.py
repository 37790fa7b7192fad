"""What idle sessions share to stay small must never let one session touch
another: the one empty input buffer refuses to grow, a client's bytes stay in
its own session, and the idle sweeper's heap (sessions ended in any order, active in
any order) times every session out exactly at its own deadline."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailappliance.linesession import _NO_INPUT, idle_sweeper
from mailappliance.smtp.server import SMTPSession
from tests.test_idle_sessions import IdleTransport, connect, factory


def test_the_shared_empty_input_buffer_refuses_to_grow() -> None:
    """Every way of writing into the buffer idle sessions share fails, and it stays empty."""
    shared = _NO_INPUT
    with pytest.raises(TypeError):
        shared += b"RCPT TO:<victim@example.org>\r\n"
    writes: list[Callable[[], object]] = [lambda: shared.extend(b"x"), lambda: shared.append(0x78),
                                          lambda: shared.insert(0, 0x78),
                                          lambda: shared.__setitem__(slice(0, 0), b"x")]
    for write in writes:
        with pytest.raises(TypeError):
            write()
    shared.clear()
    del shared[:10]
    assert shared == b"" and len(_NO_INPUT) == 0


def test_a_clients_bytes_stay_in_its_own_session(tmp_path: Path) -> None:
    """A partial command from one client is never seen by, or completed with the bytes of, another."""
    clock = Clock()
    smtp = factory(tmp_path, clock)
    sent: dict[str, list[bytes]] = {"a": [], "b": []}
    a, b = connect(smtp, IdleTransport("192.0.2.7")), connect(smtp, IdleTransport("192.0.2.8"))
    a.send, b.send = sent["a"].append, sent["b"].append  # type: ignore[method-assign,assignment]
    a.dataReceived(b"EHLO a.example\r\nMAIL FROM:<a@example.n")  # a partial line stays in a's buffer
    assert bytes(a.input) == b"MAIL FROM:<a@example.n" and not b.input
    b.dataReceived(b"et>\r\n")  # completes nothing of a's: a MAIL-less garbage line of b's own
    assert not b.input and sent["b"] and not sent["b"][-1].startswith(b"250")
    assert bytes(a.input) == b"MAIL FROM:<a@example.n" and len(_NO_INPUT) == 0


def test_sweeper_times_every_session_out_exactly_under_random_churn(tmp_path: Path) -> None:
    """Hundreds of sessions opened, active, closed in random order: each open one times out at
    exactly its last activity + idle_timeout, no closed one ever does, and nothing is left behind."""
    rng = random.Random(15)
    clock = Clock()
    smtp = factory(tmp_path, clock, idle_timeout=50)
    sweeper = idle_sweeper(clock)
    live: dict[int, tuple[SMTPSession, IdleTransport, float]] = {}  # by serial: session, transport, deadline
    closed: list[IdleTransport] = []
    for step in range(3000):
        action = rng.random()
        if action < 0.35 or not live:
            transport = IdleTransport(f"10.{step // 62500}.{step // 250 % 250}.{step % 250}")
            session = connect(smtp, transport)
            live[step] = (session, transport, clock.seconds() + 50)
        elif action < 0.6:
            key = rng.choice(list(live))
            session, transport, _ = live.pop(key)
            session.connectionLost(Failure(ConnectionError("reset")))
            closed.append(transport)
        elif action < 0.85:
            key = rng.choice(list(live))
            session, transport, _ = live[key]
            session.dataReceived(b"NOOP\r\n")
            live[key] = (session, transport, clock.seconds() + 50)
        else:
            clock.advance(rng.choice((0.5, 1.0, 3.25)))
        now = clock.seconds()
        for key, (session, transport, deadline) in list(live.items()):
            assert transport.disconnecting == (deadline <= now), (key, deadline, now)
            if transport.disconnecting:
                live.pop(key)
                session.connectionLost(Failure(ConnectionError("closed after the timeout")))
        assert len(sweeper) == len(live)
    assert not any(t.disconnecting for t in closed)
    clock.advance(50)
    assert all(t.disconnecting for _, t, _ in live.values())
