"""Outbound delivery end to end: a subscriber submits, twisted.names on loopback serves
the MX, a receiver on loopback gets the mail - retries, reports, crashes, TLS policy."""

from __future__ import annotations

import json
import smtplib
import time
from typing import Any, Callable

import pytest

from mailappliance.queue.spool import Envelope, OutboundSpool
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port

pytest_plugins = ["tests.remote"]

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: friend@remote.example\r\nSubject: outbound\r\n\r\n"
           b"Hello world,\r\n.a line with a leading dot\r\n..and two\r\n\r\n")


@pytest.fixture
def world(dns_server: Any, smtp_receiver: Any, pki: Any) -> dict[str, Any]:
    port = free_port()
    dns_server.serve({
        "remote.example": ["MX('remote.example', 10, 'mx1.remote.example')",
                           "A('mx1.remote.example', '127.0.0.2')"],
        "multi.example": ["MX('multi.example', 10, 'dead.multi.example')",
                          "MX('multi.example', 20, 'alive.multi.example')",
                          "A('dead.multi.example', '127.0.0.5')", "A('alive.multi.example', '127.0.0.6')"],
        "secure.example": ["MX('secure.example', 10, 'mx.secure.example')",
                           "A('mx.secure.example', '127.0.0.7')"],
        "gone.example": ["MX('gone.example', 0, '')"],  # null MX (RFC 7505)
    })
    tls = (pki.server_cert, pki.server_key)
    return {
        "port": port,
        "remote": smtp_receiver(host="127.0.0.2", port=port, tls=tls),
        "alive": smtp_receiver(host="127.0.0.6", port=port, tls=tls),
        "secure": smtp_receiver(host="127.0.0.7", port=port, tls=tls),
        "dns": dns_server,
    }


@pytest.fixture
def outbound(appliance: Callable[..., Appliance], world: dict[str, Any], pki: Any) -> Appliance:
    instance = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "retry_schedule": [0.5],
        "scan_interval": 0.2, "verify_domains": ["secure.example"], "ca_file": str(pki.server_ca),
        "connect_timeout": 2, "command_timeout": 10,
    }})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    return instance


def submit(instance: Appliance, recipients: list[str], message: bytes = MESSAGE) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("alice", "alice-password")
        assert smtp.sendmail("alice@example.org", recipients, message) == {}


def queue_size(instance: Appliance) -> int:
    return len(OutboundSpool(instance.root / "spool").queued_ids())


def alice_mail(instance: Appliance) -> list[bytes]:
    new = instance.maildir_root / "alice" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_delivered_byte_for_byte_over_starttls(outbound: Appliance, world: dict[str, Any]) -> None:
    """Mail for two recipients at one domain goes in one transaction over STARTTLS, byte for byte, then unspooled."""
    submit(outbound, ["friend@remote.example", "other@Remote.Example"])
    [received] = world["remote"].wait_for(1)
    assert received.mail_from == "alice@example.org"
    assert sorted(received.rcpt_tos) == ["friend@remote.example", "other@remote.example"]  # one transaction
    assert received.tls
    assert received.data.startswith(b"Received: from ") and received.data.endswith(MESSAGE)
    assert b"(authenticated as alice via PLAIN)" in received.data
    wait_until(lambda: queue_size(outbound) == 0, what="an empty queue")
    assert "status=sent" in outbound.log() and "tls=True" in outbound.log()


def test_temporary_failures_are_retried_and_delivered_once(outbound: Appliance, world: dict[str, Any]) -> None:
    """Two 451s at DATA are retried: the third session delivers, exactly once, and the message leaves the queue."""
    world["remote"].data_replies = ["451 4.3.0 try later", "451 4.3.0 try later"]
    submit(outbound, ["friend@remote.example"])
    world["remote"].wait_for(1)
    wait_until(lambda: "done: delivered=1 failed=0" in outbound.log(), what="the message finished and unspooled")
    assert queue_size(outbound) == 0  # nothing left that a later round could send again
    assert len(world["remote"].messages) == 1 and world["remote"].sessions == 3
    assert outbound.log().count("status=deferred") == 2


def test_permanent_failure_of_one_recipient_reports_to_sender(outbound: Appliance, world: dict[str, Any]) -> None:
    """A 550 for one recipient sends the sender a DSN naming only that one; the other is delivered."""
    world["remote"].rcpt_replies["nobody@remote.example"] = "550 5.1.1 no such user here"
    submit(outbound, ["friend@remote.example", "nobody@remote.example"])
    [received] = world["remote"].wait_for(1)
    assert received.rcpt_tos == ["friend@remote.example"]
    wait_until(lambda: len(alice_mail(outbound)) == 1, what="a report to alice")
    [report] = alice_mail(outbound)
    assert b"Return-Path: <>" in report and b"multipart/report; report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; nobody@remote.example" in report and b"Status: 5.1.1" in report
    assert b"friend@remote.example" not in report.split(b"message/delivery-status")[1].split(b"rfc822-headers")[0]
    wait_until(lambda: queue_size(outbound) == 0, what="an empty queue")


def test_null_mx_and_unknown_domain_bounce_at_once(outbound: Appliance) -> None:
    """A domain with a null MX bounces at once with status 5.1.10."""
    submit(outbound, ["x@gone.example"])
    wait_until(lambda: len(alice_mail(outbound)) == 1, what="a report to alice")
    assert b"Status: 5.1.10" in alice_mail(outbound)[0]


def test_next_mx_is_tried_when_the_first_is_down(outbound: Appliance, world: dict[str, Any]) -> None:
    """When the first MX does not answer, the next one by preference gets the message."""
    submit(outbound, ["someone@multi.example"])
    [received] = world["alive"].wait_for(1)
    assert received.rcpt_tos == ["someone@multi.example"]


def test_certificate_failure_for_a_verify_domain_is_temporary(outbound: Appliance, world: dict[str, Any]) -> None:
    """A certificate that fails verification for a verify_domains domain defers (4.4.2): kept, no report."""
    submit(outbound, ["someone@secure.example"])  # the receiver's certificate names localhost, not mx.secure.example
    wait_until(lambda: outbound.log().count("to=<someone@secure.example>") >= 2, what="two attempts")
    assert world["secure"].messages == [] and queue_size(outbound) == 1
    assert alice_mail(outbound) == []  # temporary: no report
    listing = outbound.admin("queue", "list")
    assert "1 message(s) queued" in listing.stdout and "4.4.2" in listing.stdout


def test_queue_admin_show_retry_delete(outbound: Appliance, world: dict[str, Any]) -> None:
    """mailappliance-admin queue show/retry/delete work on a deferred message and delete removes it."""
    world["remote"].data_replies = ["451 4.3.0 later"] * 1000
    submit(outbound, ["friend@remote.example"])
    wait_until(lambda: "status=deferred" in outbound.log(), what="a deferred attempt")
    [queue_id] = OutboundSpool(outbound.root / "spool").queued_ids()
    shown = outbound.admin("queue", "show", queue_id)
    assert shown.returncode == 0 and "<friend@remote.example>  pending" in shown.stdout
    assert "Subject: outbound" in shown.stdout and "submitted by:  alice" in shown.stdout
    assert outbound.admin("queue", "retry", queue_id).returncode == 0
    assert outbound.admin("queue", "delete", queue_id).returncode == 0
    assert queue_size(outbound) == 0
    assert outbound.admin("queue", "show", queue_id).returncode == 1


def test_kill_9_with_a_full_queue_loses_nothing(outbound: Appliance, world: dict[str, Any]) -> None:
    """After kill -9 with ten deferred messages, a restart delivers each exactly once."""
    receiver = world["remote"]
    receiver.data_replies = ["451 4.3.0 not yet"] * 10_000
    tokens = [f"token-{i}" for i in range(10)]
    for token in tokens:
        submit(outbound, ["friend@remote.example"], MESSAGE + token.encode() + b"\r\n")
    wait_until(lambda: outbound.log().count("status=deferred") >= 5, what="five deferred attempts")
    outbound.kill9()
    receiver.data_replies = []
    outbound.start()
    received = receiver.wait_for(len(tokens), timeout=60)
    wait_until(lambda: queue_size(outbound) == 0, what="an empty queue")
    bodies = [m.data for m in received]
    for token in tokens:
        copies = sum(token.encode() + b"\r\n" in body for body in bodies)
        assert copies == 1, (token, copies)


def test_delay_warning_then_delivery(appliance: Callable[..., Appliance], world: dict[str, Any], pki: Any) -> None:
    """A message deferred past delay_warning_after gets one delay warning, then is delivered with no failure report."""
    instance = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "retry_schedule": [0.3],
        "scan_interval": 0.2, "delay_warning_after": 0.5, "connect_timeout": 2}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    world["remote"].data_replies = ["451 4.3.0 later"] * 5
    submit(instance, ["friend@remote.example"])
    world["remote"].wait_for(1)
    wait_until(lambda: queue_size(instance) == 0, what="an empty queue")
    [warning] = alice_mail(instance)  # exactly one warning, and no failure report
    assert b"Subject: Delivery delayed" in warning and b"Action: delayed" in warning


def test_smarthost_with_login_and_verified_tls(appliance: Callable[..., Appliance], world: dict[str, Any],
                                               pki: Any) -> None:
    """Through a smarthost with AUTH and verified TLS the message arrives with both Received headers."""
    relay = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "scan_interval": 0.2}})
    assert relay.admin("user", "add", "relay@example.net", "--uid", "edge-relay",
                       password="relay-password").returncode == 0
    # the relay lets this account send as the edge's users (its sender policy applies to relays too)
    assert relay.admin("alias", "add", "edge-relay", "alice@example.org").returncode == 0
    relay.start()
    edge = appliance(pki=pki, start=False, extra={"queue": {
        "smarthost": f"[localhost]:{relay.ports['submission']}", "smarthost_user": "edge-relay",
        "smarthost_password": "relay-password", "ca_file": str(pki.server_ca), "scan_interval": 0.2,
        "retry_schedule": [0.5]}})
    assert edge.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    edge.start()
    submit(edge, ["friend@remote.example"])
    [received] = world["remote"].wait_for(1)  # edge -> smarthost (login, verified TLS) -> remote MX
    assert received.data.endswith(MESSAGE) and received.data.count(b"Received: from ") == 2
    assert b"(authenticated as edge-relay via PLAIN)" in received.data
    assert "auth ok: uid=edge-relay login='edge-relay' mechanism=PLAIN" in relay.log()


def test_a_flat_spool_of_the_previous_release_is_delivered(appliance: Callable[..., Appliance],
                                                           world: dict[str, Any], pki: Any) -> None:
    """queue/<id>.json + <id>.eml as the previous release left them (one deferred, one due) are moved
    into the new layout at start and delivered; nothing is left in the flat directory."""
    instance = appliance(pki=pki, start=False, extra={"queue": {
        "resolver": world["dns"].address, "smtp_port": world["port"], "scan_interval": 0.2}})
    flat = instance.root / "spool" / "queue"
    flat.mkdir(parents=True)
    for n, next_attempt in enumerate((0.0, time.time() + 1)):
        queue_id = f"{int(time.time())}.M{n}P1Q1.old"
        envelope = Envelope.new(queue_id, "alice@example.org", ["friend@remote.example"])
        envelope.next_attempt = next_attempt
        (flat / f"{queue_id}.eml").write_bytes(MESSAGE + f"old-{n}\r\n".encode())
        (flat / f"{queue_id}.json").write_text(json.dumps(envelope.to_json()))
    instance.start()
    received = world["remote"].wait_for(2)
    assert sorted(m.data.rsplit(b"\r\n", 2)[-2] for m in received) == [b"old-0", b"old-1"]
    wait_until(lambda: queue_size(instance) == 0, what="an empty queue")
    assert "moved 2 message(s) of the flat spool into deferred/" in instance.log()
    assert not [p for p in flat.iterdir() if p.is_file() and p.name != ".lock"]
