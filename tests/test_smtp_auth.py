"""STARTTLS, AUTH, submission rules and sender policy, on an in-memory transport.

The TLS handshake itself is simulated (``handshakeCompleted``); the real
handshake is exercised against the daemon in test_submission.py.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailappliance.credentials import SubscriberChecker, SubscriberRealm
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.queue.spool import OutboundSpool
from mailappliance.delivery import commit_now
from mailappliance.smtp.server import SMTPConfig, SMTPFactory

ALICE = Subscriber(dn="uid=alice,dc=x", uid="alice", mail="alice@example.org",
                   aliases=("a.liddell@example.org",), certificates=(b"alice-der",))
DIRECTORY = {a: ALICE for a in ALICE.addresses}


class FakeDirectory:
    """What the checker needs of a Directory; passwords from a dict."""

    def __init__(self) -> None:
        self.up = True

    def authenticate(self, login: str, password: str):
        if not self.up:
            return fail(DirectoryUnavailable("down"))
        ok = login in ("alice", "alice@example.org") and password == "alice-password"
        return succeed(ALICE if ok else None)

    def find_by_certificate(self, der: bytes):
        return succeed(ALICE if der in ALICE.certificates else None)


class TLSStringTransport(StringTransport):
    """A StringTransport that records the STARTTLS switch."""

    tls_context: Any = None

    def startTLS(self, context: Any) -> None:
        self.tls_context = context


@attrs.frozen
class FakeCertificate:
    der: bytes
    verified: bool
    subject: str = "CN=alice"
    reason: str = ""


class Session:
    def __init__(self, tmp_path: Path, role: str = "submission", certificate: FakeCertificate | None = None,
                 implicit_tls: bool = False) -> None:
        self.directory = FakeDirectory()
        checker = SubscriberChecker(self.directory, 60, Clock())  # type: ignore[arg-type]
        self.spool_dir = tmp_path / "spool"
        self.config = SMTPConfig(
            hostname="mx.example.org", role=role, local_domains=frozenset({"example.org"}),
            maildir_root=tmp_path / "mail", incoming_dir=tmp_path / "incoming", max_message_size=100_000,
            tls=object(), require_auth=role != "mx", implicit_tls=implicit_tls, listener=role,
        )
        self.config.incoming_dir.mkdir(exist_ok=True)
        factory = SMTPFactory(
            self.config, lambda a: succeed(DIRECTORY.get(a)), lambda job: maybeDeferred(commit_now, job),
            portal=Portal(SubscriberRealm(), [checker]), spool=OutboundSpool(self.spool_dir),
            peer_certificate=lambda transport: certificate,
        )
        self.protocol = factory.buildProtocol(None)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "198.51.100.9", 5000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value().decode().splitlines()

    def last(self, data: bytes) -> str:
        return self.send(data)[-1]

    def handshake(self) -> None:
        self.transport.clear()
        self.protocol.handshakeCompleted()

    def starttls(self) -> None:
        self.send(b"EHLO client\r\n")
        assert self.last(b"STARTTLS\r\n") == "220 2.0.0 Ready to start TLS"
        self.handshake()
        self.send(b"EHLO client\r\n")

    def spooled(self) -> list[str]:
        return OutboundSpool(self.spool_dir).queued_ids()


def plain(login: str, password: str) -> bytes:
    return base64.b64encode(f"\0{login}\0{password}".encode())


def test_no_auth_before_tls(tmp_path: Path) -> None:
    s = Session(tmp_path)
    lines = s.send(b"EHLO client\r\n")
    assert "250 STARTTLS" in lines and not any("AUTH" in line for line in lines)
    assert s.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n").startswith("530 5.7.0")
    assert s.last(b"MAIL FROM:<alice@example.org>\r\n").startswith("530 5.7.0")


def test_auth_plain_inside_tls(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    assert s.transport.tls_context is s.config.tls
    lines = s.send(b"EHLO client\r\n")
    assert "250 AUTH PLAIN LOGIN" in lines and not any("STARTTLS" in line for line in lines)
    assert s.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n") == \
        "235 2.7.0 Authentication successful"
    assert s.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n").startswith("503 5.5.1")


def test_auth_plain_with_continuation_and_login_mechanism(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    assert s.last(b"AUTH PLAIN\r\n") == "334 "
    assert s.last(plain("alice", "wrong") + b"\r\n").startswith("535 5.7.8")
    assert s.last(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6"
    assert s.last(base64.b64encode(b"alice") + b"\r\n") == "334 UGFzc3dvcmQ6"
    assert s.last(base64.b64encode(b"alice-password") + b"\r\n").startswith("235 2.7.0")


def test_auth_cancel_bad_base64_and_unknown_mechanism(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH LOGIN\r\n")
    assert s.last(b"*\r\n").startswith("501 5.0.0")
    assert s.last(b"AUTH PLAIN !!!notbase64\r\n").startswith("501 5.5.2")
    assert s.last(b"AUTH CRAM-MD5\r\n").startswith("504 5.5.4")
    assert s.last(b"NOOP\r\n").startswith("250")


def test_directory_down_gives_454(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    s.directory.up = False
    assert s.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n").startswith("454 4.7.0")


def test_starttls_discards_pipelined_commands(tmp_path: Path) -> None:
    s = Session(tmp_path, role="mx")
    s.send(b"EHLO client\r\n")
    replies = s.send(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert replies == ["220 2.0.0 Ready to start TLS"]
    s.handshake()
    assert s.transport.value() == b""
    # state was reset: the injected MAIL did not survive, and EHLO is needed again
    assert s.last(b"RCPT TO:<alice@example.org>\r\n").startswith("503 5.5.1")
    assert s.last(b"MAIL FROM:<x@example.net>\r\n").startswith("503 5.5.1")
    assert s.last(b"STARTTLS\r\n").startswith("503 5.5.1")


def test_submission_relays_for_subscriber_into_spool(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice@example.org", "alice-password") + b"\r\n")
    replies = s.send(b"MAIL FROM:<a.liddell@example.org>\r\nRCPT TO:<bob@remote.example>\r\n"
                     b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: out\r\n\r\nhi\r\n.\r\n")
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250"]
    [queue_id] = s.spooled()
    envelope = OutboundSpool(s.spool_dir).envelope(queue_id)
    assert [r.address for r in envelope.recipients] == ["bob@remote.example"]
    assert envelope.authenticated_as == "alice"
    data = (s.spool_dir / "queue" / f"{queue_id}.eml").read_bytes()
    assert b"with ESMTPSA id" in data and b"(authenticated as alice via PLAIN)" in data
    assert len(list((tmp_path / "mail" / "alice" / "new").iterdir())) == 1


@pytest.mark.parametrize("sender", [b"<bob@example.org>", b"<alice@remote.example>", b"<@x.org:alice@example.org>",
                                    b'<"alice"@example.org>'])
def test_subscriber_cannot_forge_sender(tmp_path: Path, sender: bytes) -> None:
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n")
    assert s.last(b"MAIL FROM:" + sender + b"\r\n").startswith("553 5.7.1")


def test_null_sender_allowed_for_subscriber(tmp_path: Path) -> None:
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n")
    assert s.last(b"MAIL FROM:<>\r\n").startswith("250 2.1.0")


def test_client_certificate_authenticates_without_password(tmp_path: Path) -> None:
    s = Session(tmp_path, role="submissions", implicit_tls=True, certificate=FakeCertificate(b"alice-der", True))
    s.handshake()
    lines = s.send(b"EHLO client\r\n")
    assert not any("AUTH" in line or "STARTTLS" in line for line in lines)
    assert s.last(b"MAIL FROM:<alice@example.org>\r\n").startswith("250")
    assert s.last(b"RCPT TO:<bob@remote.example>\r\n").startswith("250")
    s.send(b"DATA\r\nSubject: c\r\n\r\nx\r\n.\r\n")
    [queue_id] = s.spooled()
    assert b"(authenticated as alice via certificate)" in (s.spool_dir / "queue" / f"{queue_id}.eml").read_bytes()


@pytest.mark.parametrize("certificate", [FakeCertificate(b"alice-der", False, reason="expired"),
                                         FakeCertificate(b"stranger-der", True)])
def test_untrusted_or_unknown_certificate_grants_nothing(tmp_path: Path, certificate: FakeCertificate) -> None:
    s = Session(tmp_path, role="submissions", implicit_tls=True, certificate=certificate)
    s.handshake()
    assert "250 AUTH PLAIN LOGIN" in s.send(b"EHLO client\r\n")
    assert s.last(b"MAIL FROM:<alice@example.org>\r\n").startswith("530 5.7.0")
    assert s.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n").startswith("235")


def test_implicit_tls_reads_nothing_before_handshake(tmp_path: Path) -> None:
    s = Session(tmp_path, role="submissions", implicit_tls=True)
    assert s.send(b"EHLO early\r\n") == []
    s.handshake()
    assert s.transport.value().decode().splitlines()[0] == "250-mx.example.org"


def test_mx_refuses_relay_even_after_ehlo_in_tls(tmp_path: Path) -> None:
    s = Session(tmp_path, role="mx")
    s.starttls()
    s.send(b"MAIL FROM:<x@example.net>\r\n")
    assert s.last(b"RCPT TO:<bob@remote.example>\r\n").startswith("554 5.7.1")
    assert s.spooled() == []
