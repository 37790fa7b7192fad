"""Forwarding to outside addresses with SRS, end to end on both directory backends: the real
daemon, twisted.names on loopback for MX and SPF records, scripted receivers for the
remote domains.  A forwarded copy leaves with an SRS0 sender in our domain that SPF
passes; a bounce to it goes back to the original sender; forged or expired SRS
addresses are refused and relay nothing."""

from __future__ import annotations

import smtplib
from typing import Any, Callable

import dns.resolver
import pytest

from mailappliance.queue.spool import OutboundSpool
from mailappliance.smtp.replies import SRS_INVALID
from mailappliance.srs import Srs, SrsKeys, read_key
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.forwarding import set_forwards
from tests.replies import answered

pytest_plugins = ["tests.remote"]

spf = pytest.importorskip("spf")  # pyspf: the msgauth checks depend on it too

MESSAGE = b"From: Eve <eve@sender.example>\r\nTo: alice@example.org\r\nSubject: forward me\r\n\r\nhello\r\n"
DAY = 86400.0


@pytest.fixture
def world(dns_server: Any, smtp_receiver: Any) -> dict[str, Any]:
    """remote.example (the forwarding targets) and sender.example (where bounces go back),
    with SPF records: ours names 127.0.0.1, sender.example's does not."""
    port = free_port()
    dns_server.serve({
        "remote.example": ["MX('remote.example', 10, 'mx.remote.example')", "A('mx.remote.example', '127.0.0.2')"],
        "sender.example": ["MX('sender.example', 10, 'mx.sender.example')", "A('mx.sender.example', '127.0.0.6')",
                           "TXT('sender.example', b'v=spf1 ip4:192.0.2.1 -all')"],
        "example.org": ["TXT('example.org', b'v=spf1 ip4:127.0.0.1 -all')"],
    })
    return {"port": port, "dns": dns_server,
            "remote": smtp_receiver(host="127.0.0.2", port=port), "sender": smtp_receiver(host="127.0.0.6", port=port)}


BOTH_BACKENDS = pytest.mark.parametrize("forwarding", ["ldif", "ldap"], indirect=True)


@pytest.fixture
def forwarding(request: pytest.FixtureRequest, appliance: Callable[..., Appliance], world: dict[str, Any]) -> Appliance:
    """alice forwards everything to alice@remote.example; bob forwards and keeps a copy (LDIF
    unless the test asks for both backends: only reading the attribute depends on it)."""
    backend = getattr(request, "param", "ldif")
    slapd = request.getfixturevalue("slapd") if backend == "ldap" else None
    instance = appliance(backend=backend, slapd=slapd, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "retry_schedule": [0.5],
        "scan_interval": 0.2, "connect_timeout": 2, "command_timeout": 10}})
    for login in ("alice@example.org", "bob@example.org"):
        assert instance.admin("user", "add", login, password="a-password").returncode == 0
    set_forwards(instance, "alice", ["alice@remote.example"])
    set_forwards(instance, "bob", ["bob@remote.example", "bob@example.org"])
    instance.start()
    return instance


def mailbox(instance: Appliance, uid: str) -> list[bytes]:
    new = instance.maildir_root / uid / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def queue_size(instance: Appliance) -> int:
    return len(OutboundSpool(instance.root / "spool").queued_ids())


def spf_result(world: dict[str, Any], sender: str) -> str:
    """What an SPF check at the destination says about ``sender`` from 127.0.0.1 (pyspf, our loopback DNS)."""
    host, port = world["dns"].address.split(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [host], int(port)

    def lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
        try:
            answer = resolver.resolve(name, qtype, lifetime=5)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return []
        if qtype == "TXT":
            return [((name, qtype), rdata.strings) for rdata in answer]
        return [((name, qtype), rdata.to_text()) for rdata in answer]

    saved = spf.DNSLookup
    spf.DNSLookup = lookup
    try:
        return spf.check2(i="127.0.0.1", s=sender, h="mx.test.example")[0]
    finally:
        spf.DNSLookup = saved


def send_from_outside(instance: Appliance, sender: str, recipients: list[str], message: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("mx.sender.example")
        assert smtp.sendmail(sender, recipients, message) == {}


def our_srs(instance: Appliance) -> Srs:
    """An Srs with this daemon's own key (made next to its spool on first start)."""
    return Srs(SrsKeys(read_key(instance.root / "srs.key")), "example.org")


@BOTH_BACKENDS
def test_forwarded_copy_has_an_srs_sender_that_passes_spf(forwarding: Appliance, world: dict[str, Any]) -> None:
    """alice's mail reaches alice@remote.example from SRS0=...@example.org (SPF pass; eve's own: fail), no copy."""
    send_from_outside(forwarding, "eve@sender.example", ["alice@example.org"])
    [received] = world["remote"].wait_for(1)
    assert received.rcpt_tos == ["alice@remote.example"]
    assert received.mail_from.startswith("SRS0=") and received.mail_from.endswith("@example.org")
    assert received.data.endswith(MESSAGE) and received.data.startswith(b"Received: from mx.sender.example")
    assert spf_result(world, received.mail_from) == "pass"
    assert spf_result(world, "eve@sender.example") == "fail"
    wait_until(lambda: queue_size(forwarding) == 0, what="an empty queue")
    assert mailbox(forwarding, "alice") == []


@BOTH_BACKENDS
def test_keep_a_local_copy(forwarding: Appliance, world: dict[str, Any]) -> None:
    """bob lists his own address among his forwarding addresses: a copy stays in his mailbox too."""
    send_from_outside(forwarding, "eve@sender.example", ["bob@example.org"])
    [received] = world["remote"].wait_for(1)
    assert received.rcpt_tos == ["bob@remote.example"]
    [kept] = wait_until(lambda: mailbox(forwarding, "bob"), what="bob's copy")
    assert kept.startswith(b"Return-Path: <eve@sender.example>\r\n") and kept.endswith(MESSAGE)


def test_bounce_to_the_srs_address_returns_to_the_original_sender(forwarding: Appliance,
                                                                     world: dict[str, Any]) -> None:
    """A DSN sent to our SRS0 address is accepted and relayed to eve@sender.example, with the null sender."""
    send_from_outside(forwarding, "eve@sender.example", ["alice@example.org"])
    [received] = world["remote"].wait_for(1)
    bounce = b"From: MAILER-DAEMON@remote.example\r\nSubject: Undelivered Mail\r\n\r\nsorry\r\n"
    with smtplib.SMTP("127.0.0.1", forwarding.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("mx.remote.example")
        assert smtp.sendmail("", [received.mail_from], bounce) == {}
    [returned] = world["sender"].wait_for(1)
    assert returned.mail_from == "" and returned.rcpt_tos == ["eve@sender.example"]
    assert returned.data.endswith(bounce)
    assert f"SRS bounce rcpt=<{received.mail_from.lower()}> returns to <eve@sender.example>" in forwarding.log()


def test_a_refused_forward_reports_to_the_original_sender(forwarding: Appliance, world: dict[str, Any]) -> None:
    """When the forwarding target refuses, our own report goes to eve@sender.example (not lost at the SRS address)."""
    world["remote"].rcpt_replies["alice@remote.example"] = "550 5.1.1 no such user"
    send_from_outside(forwarding, "eve@sender.example", ["alice@example.org"])
    [report] = world["sender"].wait_for(1)
    assert report.mail_from == "" and report.rcpt_tos == ["eve@sender.example"]
    assert b"Final-Recipient: rfc822; alice@remote.example" in report.data and b"Status: 5.1.1" in report.data


def test_forged_and_expired_srs_addresses_relay_nothing(forwarding: Appliance, world: dict[str, Any]) -> None:
    """SRS addresses with a made-up hash, another key's hash or an expired day are refused 550 and nothing is queued."""
    import time

    mine = our_srs(forwarding)
    expired = mine.forward("victim@sender.example", time.time() - 30 * DAY)
    other = Srs(SrsKeys(b"somebody else's key, 32 bytes..."), "example.org").forward("victim@sender.example",
                                                                                    time.time())
    probes = ["SRS0=AAAAAAAA=AA=sender.example=victim@example.org", expired, other,
              "SRS1=AAAAAAAA=sender.example==AAAAAAAA=AA=remote.example=victim@example.org"]
    with smtplib.SMTP("127.0.0.1", forwarding.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("mx.attacker.example")
        assert smtp.mail("")[0] == 250
        for probe in probes:
            assert answered(smtp.rcpt(probe), SRS_INVALID), probe  # type: ignore[arg-type]
        assert smtp.docmd("DATA")[0] == 554
    assert queue_size(forwarding) == 0 and world["sender"].messages == []
    assert forwarding.log().count("SRS address refused") == len(probes)
