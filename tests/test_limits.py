"""Rate limits as pure bookkeeping with a controlled clock, and against the daemon."""

from __future__ import annotations

import smtplib
import socket
from typing import Any, Callable

from twisted.internet.task import Clock

from mailappliance.limits import LimitSettings, RateLimits, _Window, subscriber_limits
from tests.daemon import Appliance

SMALL = LimitSettings(connections_per_minute=3, concurrent_per_address=2, max_connections=4,
                      messages_per_hour=2, recipients_per_hour=5, recipients_per_message=3)


def test_connection_limits() -> None:
    clock = Clock()
    limits = RateLimits(SMALL, clock)
    assert limits.connection_opened("192.0.2.1") is None
    assert limits.connection_opened("192.0.2.1") is None
    assert limits.connection_opened("192.0.2.1").limit == "concurrent_per_address"
    limits.connection_closed("192.0.2.1")
    assert limits.connection_opened("192.0.2.1") is None
    limits.connection_closed("192.0.2.1")
    hit = limits.connection_opened("192.0.2.1")
    assert (hit.limit, hit.code, hit.status) == ("connections_per_minute", 421, "4.7.0")
    clock.advance(61)
    assert limits.connection_opened("192.0.2.1") is None
    assert limits.connection_opened("192.0.2.2") is None
    assert limits.connection_opened("192.0.2.3") is None
    assert limits.connection_opened("192.0.2.4").limit == "max_connections"


def test_the_sliding_window_keeps_a_running_total_that_expires_in_order() -> None:
    window = _Window(60)
    for second in range(100):
        window.add("alice", float(second), 2)
    assert window.total("alice", 99.0) == 2 * 60  # seconds 40..99 are inside
    window.add("bob", 99.0, 5)
    assert window.total("alice", 130.0) == 2 * 29  # 71..99 are left
    assert window.total("alice", 500.0) == 0 and window.total("alice", 500.0) == 0
    window.add("alice", 500.0)
    assert window.total("alice", 500.0) == 1 and window.total("bob", 100.0) == 5


def test_subscriber_limits_and_overrides() -> None:
    clock = Clock()
    limits = RateLimits(SMALL, clock)
    assert limits.may_add_recipient("alice", 3, SMALL).limit == "recipients_per_message"
    limits.message_sent("alice", 3)
    assert limits.may_add_recipient("alice", 2, SMALL).limit == "recipients_per_hour"
    limits.message_sent("alice", 1)
    hit = limits.may_start_message("alice", SMALL)
    assert (hit.limit, hit.code, hit.status) == ("messages_per_hour", 450, "4.7.1")
    assert limits.may_start_message("bob", SMALL) is None
    generous = subscriber_limits(SMALL, (("messages_per_hour", 10), ("bogus", 1)))
    assert generous.messages_per_hour == 10 and limits.may_start_message("alice", generous) is None
    clock.advance(3601)
    assert limits.may_start_message("alice", SMALL) is None


def test_limits_against_the_daemon(appliance: Callable[..., Appliance], pki: Any) -> None:
    instance = appliance(pki=pki, start=False, extra={"limits": {
        "messages_per_hour": 2, "recipients_per_message": 3, "concurrent_per_address": 3}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    assert instance.admin("user", "add", "bob@example.org", password="bob-password").returncode == 0
    ldif = instance.root / "users.ldif"  # an admin's per-subscriber override, by editing the directory
    ldif.write_text(ldif.read_text().replace("mail: bob@example.org", "mail: bob@example.org\ndescription: limit:messages_per_hour=5"))
    instance.start()

    def send(user: str, recipients: list[str]) -> Any:
        with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                              context=pki.client_context()) as smtp:
            smtp.login(user, f"{user}-password")
            try:
                return smtp.sendmail(f"{user}@example.org", recipients, b"Subject: x\r\n\r\ny\r\n")
            except smtplib.SMTPException as e:
                return e

    refused = send("alice", [f"r{i}@remote.example" for i in range(4)])
    assert refused == {"r3@remote.example": (452, b"4.5.3 Too many recipients for one message")}
    assert send("alice", ["r@remote.example"]) == {}
    blocked = send("alice", ["r@remote.example"])
    assert isinstance(blocked, smtplib.SMTPSenderRefused) and blocked.smtp_code == 450
    assert send("bob", ["r@remote.example"]) == {}  # bob's own limit is 5
    assert send("bob", ["r@remote.example"]) == {}
    assert send("bob", ["r@remote.example"]) == {}
    assert "limit messages_per_hour reached for alice" in instance.log()

    held = [socket.create_connection(("127.0.0.1", instance.ports["mx"])) for _ in range(3)]
    try:
        extra = socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10)
        assert extra.recv(1024).startswith(b"421 4.7.0")
        extra.close()
    finally:
        for sock in held:
            sock.close()
