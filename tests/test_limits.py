"""Rate limits as pure bookkeeping with a controlled clock, and against the daemon."""

from __future__ import annotations

import smtplib
import socket
from typing import Any, Callable

from twisted.internet.task import Clock

from pathlib import Path

import pytest
from twisted.logger import capturedLogs

import mailappliance.state.memory as memory_module
from mailappliance.config import load_config
from mailappliance.limits import RateLimits, client_keys, limit_hit, subscriber_limits
from mailappliance.settings import LimitSettings
from mailappliance.smtp import replies
from mailappliance.verdicts import Verdict
from mailappliance.state.memory import Window
from mailappliance.reload import Live, LiveParts, Reloader
from tests.conditions import wait_until
from tests.daemon import Appliance

SMALL = LimitSettings(connections_per_minute=3, concurrent_per_address=2, max_connections=4,
                      messages_per_hour=2, recipients_per_hour=5, recipients_per_message=3)



def limit_name(hit: Verdict) -> str:
    return hit.rule.removeprefix("limit.")


def reply_of(hit: Verdict) -> tuple[int, str]:
    """The SMTP code and enhanced status a limit verdict is answered with."""
    reply = replies.for_limit(hit)
    return reply.code, reply.status

def test_connection_limits() -> None:
    clock = Clock()
    limits = RateLimits(SMALL, clock)
    assert limits.connection_opened("192.0.2.1") is None
    assert limits.connection_opened("192.0.2.1") is None
    assert limit_name(limits.connection_opened("192.0.2.1")) == "concurrent_per_address"
    limits.connection_closed("192.0.2.1")
    assert limits.connection_opened("192.0.2.1") is None
    limits.connection_closed("192.0.2.1")
    hit = limits.connection_opened("192.0.2.1")
    assert (limit_name(hit), *reply_of(hit)) == ("connections_per_minute", 421, "4.7.0")
    clock.advance(61)
    assert limits.connection_opened("192.0.2.1") is None
    assert limits.connection_opened("192.0.2.2") is None
    assert limits.connection_opened("192.0.2.3") is None
    assert limit_name(limits.connection_opened("192.0.2.4")) == "max_connections"


def test_the_sliding_window_keeps_a_running_total_that_expires_in_order() -> None:
    window = Window(60)
    for second in range(100):
        window.add("alice", float(second), 2)
    assert window.total("alice", 99.0) == 2 * 60  # seconds 40..99 are inside
    window.add("bob", 99.0, 5)
    assert window.total("alice", 130.0) == 2 * 29  # 71..99 are left
    assert window.total("alice", 500.0) == 0 and window.total("alice", 500.0) == 0
    window.add("alice", 500.0)
    assert window.total("alice", 500.0) == 1 and window.total("bob", 100.0) == 5


def now(d: Any) -> Any:
    """The result of a Deferred that has fired already (the memory store answers at once)."""
    assert d.called
    return d.result


def test_subscriber_limits_and_overrides() -> None:
    """Hourly messages and recipients per subscriber, with the directory's overrides; an hour later, room again."""
    clock = Clock()
    limits = RateLimits(SMALL, clock)
    session = limits.reservation("alice", SMALL)
    assert now(session.start_message()) is None
    assert [now(session.add_recipient()) for _ in range(3)] == [None] * 3
    assert limit_name(now(session.add_recipient())) == "recipients_per_message"
    session.commit()
    assert now(session.start_message()) is None
    assert now(session.add_recipient()) is None and now(session.add_recipient()) is None
    assert limit_name(now(session.add_recipient())) == "recipients_per_hour"
    session.commit()
    hit = now(limits.reservation("alice", SMALL).start_message())
    assert (limit_name(hit), *reply_of(hit)) == ("messages_per_hour", 450, "4.7.1")
    assert now(limits.reservation("bob", SMALL).start_message()) is None
    generous = subscriber_limits(SMALL, (("messages_per_hour", 10), ("bogus", 1)))
    assert generous.messages_per_hour == 10 and now(limits.reservation("alice", generous).start_message()) is None
    clock.advance(3601)
    assert now(limits.reservation("alice", SMALL).start_message()) is None


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
    # the six sessions above must have ended on the server's side before their slots count as free
    wait_until(lambda: instance.log().count("] disconnect") >= 6, what="the earlier sessions closed")

    held = [socket.create_connection(("127.0.0.1", instance.ports["mx"])) for _ in range(3)]
    try:
        extra = socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10)
        assert extra.recv(1024).startswith(b"421 4.7.0")
        extra.close()
    finally:
        for sock in held:
            sock.close()


def test_client_addresses_are_counted_by_address_and_network() -> None:
    """IPv4 counts per address and /24, IPv6 per /64 for both; mapped IPv4 counts as IPv4."""
    assert client_keys("192.0.2.77") == ("192.0.2.77", "192.0.2.0/24")
    assert client_keys("::ffff:192.0.2.77") == ("192.0.2.77", "192.0.2.0/24")
    assert client_keys("2001:db8:1:2:aaaa::1") == ("2001:db8:1:2::/64", "2001:db8:1:2::/64")
    assert client_keys("fe80::1%eth0") == ("fe80::/64", "fe80::/64")
    assert client_keys("unknown") == ("unknown", None)


def test_each_listener_has_its_own_share_and_the_server_a_cap() -> None:
    """A full listener refuses with 421 while the others still accept; the global cap still holds."""
    limits = RateLimits(LimitSettings(max_connections=5), Clock())
    limits.set_listener_caps({"mx": 2, "submission": 2, "pop3": 0})
    assert limits.connection_opened("192.0.2.1", "mx") is None
    assert limits.connection_opened("192.0.2.2", "mx") is None
    hit = limits.connection_opened("192.0.2.3", "mx")
    assert (limit_name(hit), hit.value, *reply_of(hit)) == ("max_connections", "mx", 421, "4.7.0")
    assert limits.connection_opened("192.0.2.3", "submission") is None
    assert (limits.open_connections("mx"), limits.open_connections("submission")) == (2, 1)
    limits.connection_closed("192.0.2.1", "mx")
    assert limits.connection_opened("192.0.2.3", "mx") is None
    assert limits.connection_opened("192.0.2.4", "pop3") is None  # 0: no cap of its own
    assert limits.connection_opened("192.0.2.5", "pop3") is None
    assert limits.connection_opened("192.0.2.6", "pop3") == \
        limit_hit("max_connections", "*")
    limits.set_listener_caps({"mx": 1})  # SIGHUP: open connections stay, new ones wait for room
    limits.connection_closed("192.0.2.4", "pop3")
    assert limits.connection_opened("192.0.2.4", "mx").value == "mx"


def test_one_network_cannot_take_every_connection() -> None:
    """concurrent_per_network caps a /24 (IPv4) or /64 (IPv6) besides each address."""
    limits = RateLimits(LimitSettings(concurrent_per_address=2, concurrent_per_network=3), Clock())
    for host in (1, 2, 3):
        assert limits.connection_opened(f"192.0.2.{host}", "mx") is None
    hit = limits.connection_opened("192.0.2.4", "mx")
    assert (limit_name(hit), hit.value, *reply_of(hit)) == ("concurrent_per_network", "192.0.2.0/24", 421, "4.7.0")
    assert limits.connection_opened("192.0.3.4", "mx") is None  # the next /24
    assert limits.connection_opened("2001:db8:0:1::1", "mx") is None
    assert limits.connection_opened("2001:db8:0:1::2", "mx") is None  # the same /64: one "address"
    hit = limits.connection_opened("2001:db8:0:1:ffff::3", "mx")
    assert (limit_name(hit), hit.value) == ("concurrent_per_address", "2001:db8:0:1::/64")
    assert limits.connection_opened("2001:db8:0:2::1", "mx") is None
    limits.connection_closed("192.0.2.2", "mx")
    assert limits.connection_opened("192.0.2.4", "mx") is None


def test_closing_every_connection_leaves_no_counter_behind() -> None:
    """Connection bookkeeping is symmetric: after the last close nothing is held for any key."""
    limits = RateLimits(LimitSettings(), Clock())
    limits.set_listener_caps({"mx": 100})
    addresses = [f"198.51.100.{i}" for i in range(10)] + ["2001:db8::5", "::ffff:198.51.100.1", "unknown"]
    for address in addresses:
        assert limits.connection_opened(address, "mx") is None
    for address in addresses:
        limits.connection_closed(address, "mx")
    assert (limits.open_total, limits._open, limits._open_networks, limits._open_listeners) == (0, {}, {}, {})


def test_ipv6_clients_share_one_connection_rate_per_64() -> None:
    """connections_per_minute counts a /64 as one address: rotating addresses buys nothing."""
    clock = Clock()
    limits = RateLimits(LimitSettings(connections_per_minute=2), clock)
    for host in (1, 2):
        assert limits.connection_opened(f"2001:db8::{host}", "mx") is None
        limits.connection_closed(f"2001:db8::{host}", "mx")
    assert limit_name(limits.connection_opened("2001:db8::3", "mx")) == "connections_per_minute"
    clock.advance(61)
    assert limits.connection_opened("2001:db8::3", "mx") is None


RESERVE = LimitSettings(messages_per_hour=3, recipients_per_hour=20, recipients_per_message=8)


def _held(limits: RateLimits, uid: str) -> tuple[int, int]:
    return now(limits.held(uid))


def test_parallel_sessions_see_each_others_reservations() -> None:
    """Ten sessions of one subscriber adding recipients in turn get exactly the hourly allowance."""
    limits = RateLimits(RESERVE, Clock())
    sessions = [limits.reservation("alice", RESERVE) for _ in range(10)]
    started = [now(session.start_message()) for session in sessions]
    assert started.count(None) == 3
    assert {(limit_name(hit), *reply_of(hit)) for hit in started if hit is not None} == {
        ("messages_per_hour", 450, "4.7.1")}
    refused = set()
    accepted = 0
    for _ in range(5):
        for session in sessions:
            hit = now(session.add_recipient())
            if hit is None:
                accepted += 1
            else:
                refused.add((limit_name(hit), hit.value, *reply_of(hit)))
    assert accepted == 20 and refused == {("recipients_per_hour", "alice", 452, "4.7.1")}
    assert _held(limits, "alice") == (3, 20)
    assert now(limits.reservation("bob", RESERVE).add_recipient()) is None


def test_release_gives_back_what_was_not_committed() -> None:
    """RSET, a failed message or a disconnect releases; commit keeps; release is idempotent."""
    limits = RateLimits(RESERVE, Clock())
    first, second = limits.reservation("alice", RESERVE), limits.reservation("alice", RESERVE)
    assert now(first.start_message()) is None
    for _ in range(8):
        assert now(first.add_recipient()) is None
    hit = now(first.add_recipient())
    assert (limit_name(hit), *reply_of(hit)) == ("recipients_per_message", 452, "4.5.3")
    first.commit()
    first.release()  # after the commit: nothing left to give back
    assert _held(limits, "alice") == (1, 8)
    assert now(first.start_message()) is None  # the next transaction starts from zero recipients
    for _ in range(8):
        assert now(first.add_recipient()) is None
    assert now(second.start_message()) is None
    for _ in range(4):
        assert now(second.add_recipient()) is None
    assert limit_name(now(second.add_recipient())) == "recipients_per_hour"
    assert limit_name(now(limits.reservation("alice", RESERVE).start_message())) == "messages_per_hour"
    first.release()  # RSET
    assert _held(limits, "alice") == (2, 12)
    first.release()
    assert _held(limits, "alice") == (2, 12)
    second.withdraw_recipient()  # refused after all (unknown address)
    assert second.recipients == 3 and _held(limits, "alice") == (2, 11)
    assert now(second.start_message()) is None  # a new MAIL gives back the unfinished transaction
    assert _held(limits, "alice") == (2, 8)
    second.release()
    assert _held(limits, "alice") == (1, 8)


def test_a_release_after_expiry_leaves_the_window_right() -> None:
    """A reservation that has left the hourly window gives back nothing (no negative count later)."""
    clock = Clock()
    limits = RateLimits(RESERVE, clock)
    early, late = limits.reservation("alice", RESERVE), limits.reservation("alice", RESERVE)
    assert now(early.start_message()) is None and now(early.add_recipient()) is None
    clock.advance(1800)
    assert now(late.start_message()) is None and now(late.add_recipient()) is None
    clock.advance(1800.5)
    assert _held(limits, "alice") == (1, 1)
    early.release()
    assert _held(limits, "alice") == (1, 1)
    late.release()
    assert _held(limits, "alice") == (0, 0)
    assert len(limits.store.windows) == 0
    fresh = limits.reservation("alice", RESERVE)
    assert now(fresh.start_message()) is None
    assert [now(fresh.add_recipient()) for _ in range(8)] == [None] * 8
    assert _held(limits, "alice") == (1, 8)


def test_reserve_and_release_without_end_keeps_memory_bounded() -> None:
    """Emptied events do not pile up when two sessions reserve and release in turn for an hour."""
    generous = LimitSettings(messages_per_hour=10**6, recipients_per_hour=10**6, recipients_per_message=10**6)
    clock = Clock()
    limits = RateLimits(generous, clock)
    one, other = limits.reservation("alice", generous), limits.reservation("alice", generous)
    for _ in range(10_000):
        for session in (one, other):  # each start gives back the session's previous, older transaction
            assert now(session.start_message()) is None
            assert now(session.add_recipient()) is None and now(session.add_recipient()) is None
        clock.advance(0.1)
    assert _held(limits, "alice") == (2, 4)
    assert max(limits.store.windows.stored_events()) <= 30


def test_a_forgotten_subscriber_cannot_be_released_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """When MAX_TRACKED forgets a subscriber, that subscriber's open reservation releases nothing."""
    monkeypatch.setattr(memory_module, "MAX_TRACKED", 4)  # two subscribers' message and recipient windows
    limits = RateLimits(RESERVE, Clock())
    alice = limits.reservation("alice", RESERVE)
    assert now(alice.start_message()) is None and now(alice.add_recipient()) is None
    for uid in ("bob", "carol"):
        session = limits.reservation(uid, RESERVE)
        assert now(session.start_message()) is None and now(session.add_recipient()) is None
    assert len(limits.store.windows) == 4 and _held(limits, "alice") == (0, 0)
    assert now(alice.add_recipient()) is None  # alice is tracked again, from this recipient
    alice.release()
    assert _held(limits, "alice") == (0, 0) and _held(limits, "carol") == (1, 1)


def test_sighup_applies_new_connection_shares(tmp_path: Path) -> None:
    """A changed limits.max_connections or listener max_connections reaches RateLimits on reload."""
    config = tmp_path / "m.toml"
    listeners = "".join(f'[[listeners]]\nrole = "{role}"\nport = {port}\n'
                        for role, port in (("mx", 2525), ("submission", 5587), ("autoconfig", 8080)))
    config.write_text('[server]\nlocal_domains = ["example.org"]\n[limits]\nmax_connections = 50\n' + listeners)
    settings = load_config(config)
    limits = RateLimits(settings.limits, Clock())
    limits.set_listener_caps({l.name: l.max_connections for l in settings.listeners})
    assert limits._listener_caps == {"mx": 25, "submission": 25}
    reloader = Reloader(settings, None, None, LiveParts([Live("limits", limits)], limits=limits),  # type: ignore[arg-type]
                        None)
    config.write_text(config.read_text().replace("max_connections = 50", "max_connections = 80")
                      .replace('role = "mx"\n', 'role = "mx"\nmax_connections = 60\n'))
    with capturedLogs() as events:
        reloader._reload_settings()
    assert limits.settings.max_connections == 80 and limits._listener_caps == {"mx": 60, "submission": 20}
    assert "applied: limits, listeners.max_connections; changed but needing a restart: nothing" in \
        " ".join(e["log_format"].format(**e) for e in events)
    config.write_text(config.read_text().replace("port = 5587", "port = 5588")
                      .replace("max_connections = 60", "max_connections = 40"))
    with capturedLogs() as events:
        reloader._reload_settings()
    assert limits._listener_caps == {"mx": 40, "submission": 40}
    assert "applied: listeners.max_connections; changed but needing a restart: listeners" in \
        " ".join(e["log_format"].format(**e) for e in events)
    assert [l.port for l in reloader.settings.listeners] == [2525, 5587, 8080]  # what runs
