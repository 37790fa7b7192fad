"""Finding 6: a subscriber's hourly limits hold against parallel sessions.

Recipients are reserved at RCPT (and a message at MAIL), so sessions of the
same subscriber see each other's open transactions; RSET, a refused message
and a disconnect give the reservation back.  Here recipients_per_hour = 20.
"""

from __future__ import annotations

import smtplib
import socket
import struct
import time
from typing import Any, Callable, Iterator

import pytest

from tests.daemon import Appliance

MESSAGE = b"Subject: x\r\n\r\ny\r\n"


@pytest.fixture
def limited(appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    instance = appliance(pki=pki, start=False, extra={"limits": {
        "recipients_per_hour": 20, "recipients_per_message": 100, "messages_per_hour": 100,
        "concurrent_per_address": 50}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    instance.pki = pki  # type: ignore[attr-defined]
    return instance


def session(instance: Appliance) -> smtplib.SMTP_SSL:
    """A logged-in submission session of alice with MAIL already accepted."""
    smtp = smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=30,
                            context=instance.pki.client_context())  # type: ignore[attr-defined]
    smtp.login("alice", "alice-password")
    assert smtp.mail("alice@example.org")[0] == 250
    return smtp


def recipients(prefix: str) -> Iterator[str]:
    n = 0
    while True:
        yield f"{prefix}{n}@remote.example"
        n += 1


def test_parallel_sessions_cannot_exceed_recipients_per_hour(limited: Appliance) -> None:
    """Ten sessions adding recipients in turn get exactly 20 accepted (250) and 452 4.7.1 for the other 30; 20 recipients are sent."""
    sessions = [session(limited) for _ in range(10)]
    try:
        accepted = [0] * len(sessions)
        refusals = set()
        for round_ in range(5):
            for i, smtp in enumerate(sessions):
                code, text = smtp.rcpt(f"r{round_}-{i}@remote.example")
                if code == 250:
                    accepted[i] += 1
                else:
                    refusals.add((code, text[:6]))
        assert sum(accepted) == 20, accepted
        assert refusals == {(452, b"4.7.1 ")}
        for i, smtp in enumerate(sessions):
            if accepted[i]:
                assert smtp.data(MESSAGE)[0] == 250
    finally:
        for smtp in sessions:
            smtp.close()
    with session(limited) as smtp:
        code, text = smtp.rcpt("late@remote.example")
        assert (code, text[:6]) == (452, b"4.7.1 ")


def test_rset_gives_the_reservation_back(limited: Appliance) -> None:
    """Recipients reserved by one session block another (452 4.7.1) until the first sends RSET."""
    with session(limited) as first, session(limited) as second:
        names = recipients("first")
        assert [first.rcpt(next(names))[0] for _ in range(20)] == [250] * 20
        code, text = second.rcpt("second@remote.example")
        assert (code, text[:6]) == (452, b"4.7.1 ")
        assert first.rset()[0] == 250
        assert second.rcpt("second@remote.example")[0] == 250


def test_a_refused_message_and_a_disconnect_give_the_reservation_back(limited: Appliance) -> None:
    """A message refused after DATA (550 5.6.0, bare LF) and a connection reset both release their 20 recipients."""
    with session(limited) as second:
        with session(limited) as first:
            names = recipients("first")
            assert [first.rcpt(next(names))[0] for _ in range(20)] == [250] * 20
            assert second.rcpt("blocked@remote.example")[0] == 452
            first.putcmd("data")
            assert first.getreply()[0] == 354
            first.send(b"Subject: x\r\n\r\nbare\nline feed\r\n.\r\n")
            code, text = first.getreply()
            assert (code, text[:6]) == (550, b"5.6.0 ")
        assert second.rcpt("after-refusal@remote.example")[0] == 250
        assert second.rset()[0] == 250 and second.mail("alice@example.org")[0] == 250

        reset = session(limited)
        names = recipients("reset")
        assert [reset.rcpt(next(names))[0] for _ in range(20)] == [250] * 20
        assert second.rcpt("blocked@remote.example")[0] == 452
        assert reset.sock is not None
        reset.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # RST, no QUIT

        deadline = time.monotonic() + 30
        code = 452
        while code == 452 and time.monotonic() < deadline:  # until the server has seen the reset
            code = second.rcpt("after-reset@remote.example")[0]
            if code == 452:
                time.sleep(0.05)
        assert code == 250
