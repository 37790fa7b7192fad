"""Tracing a message (issue 12, points 11-13): Delivered-To per recipient, the Received
header's reverse name and TLS, one log line per recipient, the real status in reports."""

from __future__ import annotations

import os
import re
import smtplib
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.names import dns

from mailappliance.client_lookup import ClientLookup
from mailappliance.delivered_to import delivered_to_header
from mailappliance.delivery import CommitJob, SpoolEntry, commit_batch
from mailappliance.maildir import IncomingMessage
from mailappliance.queue.dsn import build_dsn, enhanced_status, recipient_status
from tests.conditions import wait_until
from tests.daemon import Appliance

pytest_plugins = ["tests.remote"]

RETURN_PATH = b"Return-Path: <sender@example.net>\r\n"
REST = b"Received: from x ([192.0.2.7])\r\n\tby mx; date\r\nSubject: hi\r\n\r\nbody\r\n"


class RecordingSpool:
    def __init__(self) -> None:
        self.enqueued: list[bytes] = []

    def enqueue(self, path: Path, envelope: Any) -> None:
        self.enqueued.append(path.read_bytes())


def staged(incoming: Path, first: str, spill: bool = False) -> tuple[IncomingMessage, tuple[int, int]]:
    """A received message as the session stages it: Return-Path, the first recipient's Delivered-To, the rest."""
    incoming.mkdir(exist_ok=True)
    message = IncomingMessage(incoming)
    message.write(RETURN_PATH)
    start = message.size
    message.write(delivered_to_header(first))
    span = (start, message.size)
    message.write(REST + (b"x" * (2 * 1024 * 1024) + b"\r\n" if spill else b""))
    return message, span


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_each_mailbox_gets_its_own_delivered_to(tmp_path: Path, spill: bool) -> None:
    """Three recipients (one mailbox named twice): each Maildir file names the address it came in
    for, the spool's copy has none, and nothing is left in incoming/ or any tmp/."""
    incoming = tmp_path / "incoming"
    alice, bob, carol = (tmp_path / "mail" / n for n in ("alice", "bob", "carol"))
    message, span = staged(incoming, "alice@example.org", spill)
    spool = RecordingSpool()
    headers = [delivered_to_header(a) for a in
               ("alice@example.org", "bob+lists@example.org", "alice.l@example.org", "carol@example.org")]
    job = CommitJob(message, (alice, bob, alice, carol), (SpoolEntry(spool, None),),  # type: ignore[arg-type]
                    tuple(headers), span)
    [outcome] = commit_batch([job])
    assert isinstance(outcome, list) and len(outcome) == 3
    for box, address in ((alice, "alice@example.org"), (bob, "bob+lists@example.org"),
                         (carol, "carol@example.org")):
        [stored] = list((box / "new").iterdir())
        data = stored.read_bytes()
        assert data.startswith(RETURN_PATH + f"Delivered-To: {address}\r\n".encode() + REST)
        assert stored.name == f"{message.name},S={len(data)}"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert list((box / "tmp").iterdir()) == []
    assert spool.enqueued[0].startswith(RETURN_PATH + b"Delivered-To: alice@example.org\r\n")  # body_offset skips both
    assert list(incoming.iterdir()) == []


def test_a_copy_that_cannot_be_placed_fails_only_its_message(tmp_path: Path) -> None:
    """A recipient's Maildir that cannot be made fails that message alone (the client is told
    to retry; no leftovers in incoming/); the other message of the batch is delivered."""
    incoming = tmp_path / "incoming"
    alice = tmp_path / "mail" / "alice"
    blocked = tmp_path / "mail" / "blocked"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the Maildir should be")
    first, span = staged(incoming, "alice@example.org")
    second, span2 = staged(incoming, "alice@example.org")
    jobs = [CommitJob(first, (alice, blocked), (), (delivered_to_header("alice@example.org"),
                                                    delivered_to_header("blocked@example.org")), span),
            CommitJob(second, (alice,), (), (delivered_to_header("alice@example.org"),), span2)]
    failed, ok = commit_batch(jobs)
    assert isinstance(failed, OSError) and isinstance(ok, list)
    assert second.name in [p.name.split(",")[0] for p in (alice / "new").iterdir()]
    assert not blocked.is_dir()
    assert list(incoming.iterdir()) == []


def test_a_header_value_cannot_start_a_field_of_its_own() -> None:
    """Delivered-To carries only printable ASCII of the address: control characters become '?'."""
    assert delivered_to_header("a\r\nX-Evil: 1@example.org") == b"Delivered-To: a??X-Evil:?1@example.org\r\n"


def test_trace_name_is_forward_confirmed_and_cached() -> None:
    """The Received name is the PTR name only when it resolves back to the address; loopback is
    'localhost' without DNS; a failed lookup is retried after a minute, not cached for ten."""
    class Resolver:
        def __init__(self) -> None:
            self.asked: list[str] = []
            self.fail = False

        def _answer(self, name: str, record: Any) -> Deferred:
            self.asked.append(name)
            return Deferred.fromCoroutine(self._done([dns.RRHeader(name, record.TYPE, payload=record)]))

        async def _done(self, answers: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
            return answers, [], []

        def lookupPointer(self, name: str, timeout: Any = None) -> Deferred:
            if self.fail:
                self.asked.append(name)
                return fail(TimeoutError("no answer"))
            return self._answer(name, dns.Record_PTR("mail.example.net"))

        def lookupAddress(self, name: str, timeout: Any = None) -> Deferred:
            return self._answer(name, dns.Record_A("192.0.2.7"))

        def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred:
            return Deferred.fromCoroutine(self._done([]))

    resolver, clock = Resolver(), Clock()
    lookup = ClientLookup(resolver, clock)

    def name(address: str) -> Any:
        results: list[Any] = []
        Deferred.fromCoroutine(lookup.trace_name(address)).addCallback(results.append)
        return results[0]

    assert name("192.0.2.7") == "mail.example.net"
    assert name("192.0.2.8") is None  # the name does not lead back to this address
    assert name("127.0.0.1") == "localhost" and not any("127" in n for n in resolver.asked)
    asked = len(resolver.asked)
    assert name("192.0.2.7") == "mail.example.net" and len(resolver.asked) == asked  # cached
    resolver.fail = True
    assert name("198.51.100.1") is None
    clock.advance(30)
    assert name("198.51.100.1") is None and resolver.asked.count("1.100.51.198.in-addr.arpa") == 1
    clock.advance(31)
    name("198.51.100.1")
    assert resolver.asked.count("1.100.51.198.in-addr.arpa") == 2


@pytest.mark.parametrize("code, text, expected", [
    (550, "5.1.1 <x@remote.example>: no such user", "5.1.1"),
    (556, "5.1.10 remote.example does not accept mail (null MX, RFC 7505)", "5.1.10"),
    (554, "no enhanced code here", "5.0.0"),
    (0, "gave up after 7 attempts; last answer: 451 4.4.1 connection failed: refused", "4.4.1"),
    (0, "gave up after 7 attempts; last answer: 421 too busy", "4.4.7"),
])
def test_reports_carry_the_real_status(code: int, text: str, expected: str) -> None:
    """The DSN's Status is the remote's enhanced code, our own reason's, the last attempt's on
    expiry (4.4.7 without one), and X.0.0 only when the server gave no enhanced code."""
    assert enhanced_status(code, text, "failed") == expected
    report = build_dsn(reporting_host="mx.example.org", original_sender="a@example.org", queue_id="1.M2",
                       arrival_date=0, statuses=[recipient_status("x@remote.example", "failed", code, text)],
                       original_message=b"Subject: s\r\n\r\nb\r\n")
    assert f"\r\nStatus: {expected}\r\n".encode() in report


def test_received_names_tls_and_the_reverse_name_and_logs_each_recipient(
        appliance: Callable[..., Appliance], dns_server: Any) -> None:
    """Over STARTTLS: Received says the confirmed reverse name (screening's FCrDNS) and the TLS
    version and cipher; Delivered-To names each address; one 'delivered' log line per recipient
    tells where the file is."""
    dns_server.serve({"1.0.0.127.in-addr.arpa": ["PTR('1.0.0.127.in-addr.arpa', 'client.test.example')"],
                      "test.example": ["A('client.test.example', '127.0.0.1')"]})
    lists = Path(dns_server.root) / "screening.toml"
    lists.write_text('[block]\nclient_domains = ["never.invalid"]\n')  # makes screening look the name up
    instance = appliance(start=False, extra={"queue": {"resolver": dns_server.address},
                                             "screening": {"file": str(lists)}})
    for user in ("alice", "bob"):
        assert instance.admin("user", "add", f"{user}@example.org", password=f"{user}-password").returncode == 0
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.starttls(context=instance.client_context())
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("friend@example.net", ["alice@example.org", "bob@example.org"],
                             b"Subject: t\r\n\r\nbody\r\n") == {}
    stored = {user: (instance.maildir_root / user / "new") for user in ("alice", "bob")}
    for user, new in stored.items():
        [path] = list(new.iterdir())
        data = path.read_bytes()
        assert data.split(b"\r\n")[1] == f"Delivered-To: {user}@example.org".encode()
        assert b"Received: from client.example.net (client.test.example [127.0.0.1])\r\n\t(using TLSv1." in data
        assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)\r\n\tby mx\.test\.example", data)
        wait_until(lambda: f"to=<{user}@example.org> orig_to=<{user}@example.org> relay=local" in instance.log(),
                   what="the delivery line")
        line = next(l for l in instance.log().splitlines() if f"to=<{user}@example.org> orig_to" in l)
        assert re.search(r"delay=\d+\.\d\d delays=\d+\.\d\d/0/\d+\.\d\d dsn=2\.0\.0 status=sent "
                         rf"\(delivered to maildir {user}/new/{re.escape(path.name)}\)", line), line
        assert os.path.exists(instance.maildir_root / user / "new" / path.name)
