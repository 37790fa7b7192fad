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
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import StringTransport

from mailappliance.credentials import SubscriberRealm
from mailappliance.delivery import commit_now
from mailappliance.queue.spool import OutboundSpool
from mailappliance.smtp import replies
from mailappliance.smtp.server import SMTPConfig, SMTPFactory
from tests.replies import answered
from tests.subscribers import ALICE_CERTIFICATE, PASSWORDS, InMemoryDirectory, subscriber_checker

ALICE_PASSWORD = PASSWORDS["alice"]


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
        self.directory = InMemoryDirectory()  # alice (alias a.liddell@, a certificate), bob, carol (disabled)
        checker = subscriber_checker(self.directory)
        self.spool_dir = tmp_path / "spool"
        self.config = SMTPConfig(
            hostname="mx.example.org", role=role, local_domains=frozenset({"example.org"}),
            maildir_root=tmp_path / "mail", incoming_dir=tmp_path / "incoming", max_message_size=100_000,
            tls=object(), require_auth=role != "mx", implicit_tls=implicit_tls, listener=role,
        )
        self.config.incoming_dir.mkdir(exist_ok=True)
        factory = SMTPFactory(
            self.config, self.directory.find_by_address, lambda job: maybeDeferred(commit_now, job),
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
    """Before STARTTLS submission offers no AUTH, refuses AUTH with 530 5.7.0 and MAIL with 530 5.7.0."""
    s = Session(tmp_path)
    lines = s.send(b"EHLO client\r\n")
    assert "250 STARTTLS" in lines and not any("AUTH" in line for line in lines)
    assert answered(s.last(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n"), replies.TLS_FIRST)
    assert answered(s.last(b"MAIL FROM:<alice@example.org>\r\n"), replies.AUTH_REQUIRED)


def test_auth_plain_inside_tls(tmp_path: Path) -> None:
    """Inside TLS AUTH PLAIN LOGIN is offered, STARTTLS no more; PLAIN logs in with 235, a second AUTH gets 503."""
    s = Session(tmp_path)
    s.starttls()
    assert s.transport.tls_context is s.config.tls
    lines = s.send(b"EHLO client\r\n")
    assert "250 AUTH PLAIN LOGIN" in lines and not any("STARTTLS" in line for line in lines)
    assert s.last(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n") == \
        "235 2.7.0 Authentication successful"
    assert answered(s.last(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n"), replies.ALREADY_AUTHENTICATED)


def test_auth_plain_with_continuation_and_login_mechanism(tmp_path: Path) -> None:
    """PLAIN with an empty initial response and the two-step LOGIN both work; a wrong password gets 535 5.7.8."""
    s = Session(tmp_path)
    s.starttls()
    assert s.last(b"AUTH PLAIN\r\n") == "334 "
    assert answered(s.last(plain("alice", "wrong") + b"\r\n"), replies.AUTH_INVALID)
    assert s.last(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6"
    assert s.last(base64.b64encode(b"alice") + b"\r\n") == "334 UGFzc3dvcmQ6"
    assert answered(s.last(base64.b64encode(ALICE_PASSWORD.encode()) + b"\r\n"), replies.AUTH_OK)


def test_auth_cancel_bad_base64_and_unknown_mechanism(tmp_path: Path) -> None:
    """A cancelled exchange, bad base64 and an unknown mechanism get 501 and 504 and the session goes on."""
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH LOGIN\r\n")
    assert s.last(b"*\r\n").startswith("501 5.0.0")
    assert s.last(b"AUTH PLAIN !!!notbase64\r\n").startswith("501 5.5.2")
    assert s.last(b"AUTH CRAM-MD5\r\n").startswith("504 5.5.4")
    assert answered(s.last(b"NOOP\r\n"), replies.OK)


def test_directory_down_gives_454(tmp_path: Path) -> None:
    """AUTH while the directory is down gets 454 4.7.0 (try again), not 535."""
    s = Session(tmp_path)
    s.starttls()
    s.directory.up = False
    assert answered(s.last(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n"), replies.AUTH_TEMPORARY)


def test_starttls_discards_pipelined_commands(tmp_path: Path) -> None:
    """Commands pipelined after STARTTLS are discarded, and the session state is reset by the TLS switch."""
    s = Session(tmp_path, role="mx")
    s.send(b"EHLO client\r\n")
    lines = s.send(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert lines == ["220 2.0.0 Ready to start TLS"]
    s.handshake()
    assert s.transport.value() == b""
    # state was reset: the injected MAIL did not survive, and EHLO is needed again
    assert answered(s.last(b"RCPT TO:<alice@example.org>\r\n"), replies.NEED_MAIL)
    assert answered(s.last(b"MAIL FROM:<x@example.net>\r\n"), replies.NEED_HELO)
    assert answered(s.last(b"STARTTLS\r\n"), replies.TLS_ACTIVE)


def test_submission_relays_for_subscriber_into_spool(tmp_path: Path) -> None:
    """An authenticated subscriber's remote recipient is spooled with their uid, the local one delivered."""
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice@example.org", ALICE_PASSWORD) + b"\r\n")
    mail, remote, local, data, queued = s.send(
        b"MAIL FROM:<a.liddell@example.org>\r\nRCPT TO:<bob@remote.example>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: out\r\n\r\nhi\r\n.\r\n")
    assert answered(mail, replies.SENDER_OK) and answered(remote, replies.RECIPIENT_OK)
    assert answered(local, replies.RECIPIENT_OK) and answered(data, replies.START_DATA)
    assert queued.startswith("250 2.0.0 Ok: queued as ")
    [queue_id] = s.spooled()
    envelope = OutboundSpool(s.spool_dir).envelope(queue_id)
    assert [r.address for r in envelope.recipients] == ["bob@remote.example"]
    assert envelope.authenticated_as == "alice"
    data = OutboundSpool(s.spool_dir).read_message(queue_id)
    assert b"with ESMTPSA id" in data and b"(authenticated as alice via PLAIN)" in data
    assert len(list((tmp_path / "mail" / "alice" / "new").iterdir())) == 1


@pytest.mark.parametrize("sender", [b"<bob@example.org>", b"<alice@remote.example>", b"<@x.org:alice@example.org>",
                                    b'<"alice"@example.org>'])
def test_subscriber_cannot_forge_sender(tmp_path: Path, sender: bytes) -> None:
    """An authenticated subscriber gets 553 5.7.1 for a sender address the directory does not give them."""
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n")
    assert answered(s.last(b"MAIL FROM:" + sender + b"\r\n"), replies.SENDER_NOT_OWNED)


def test_null_sender_allowed_for_subscriber(tmp_path: Path) -> None:
    """An authenticated subscriber may send with the null sender."""
    s = Session(tmp_path)
    s.starttls()
    s.send(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n")
    assert answered(s.last(b"MAIL FROM:<>\r\n"), replies.SENDER_OK)


def test_client_certificate_authenticates_without_password(tmp_path: Path) -> None:
    """A verified client certificate stored for alice logs her in on 465: no AUTH offered, relaying allowed."""
    s = Session(tmp_path, role="submissions", implicit_tls=True, certificate=FakeCertificate(ALICE_CERTIFICATE, True))
    s.handshake()
    lines = s.send(b"EHLO client\r\n")
    assert not any("AUTH" in line or "STARTTLS" in line for line in lines)
    assert answered(s.last(b"MAIL FROM:<alice@example.org>\r\n"), replies.SENDER_OK)
    assert answered(s.last(b"RCPT TO:<bob@remote.example>\r\n"), replies.RECIPIENT_OK)
    s.send(b"DATA\r\nSubject: c\r\n\r\nx\r\n.\r\n")
    [queue_id] = s.spooled()
    assert b"(authenticated as alice via certificate)" in OutboundSpool(s.spool_dir).read_message(queue_id)


@pytest.mark.parametrize("certificate", [FakeCertificate(ALICE_CERTIFICATE, False, reason="expired"),
                                         FakeCertificate(b"stranger-der", True)])
def test_untrusted_or_unknown_certificate_grants_nothing(tmp_path: Path, certificate: FakeCertificate) -> None:
    """An unverified or unknown certificate grants nothing: 530 at MAIL, AUTH still offered and working."""
    s = Session(tmp_path, role="submissions", implicit_tls=True, certificate=certificate)
    s.handshake()
    assert "250 AUTH PLAIN LOGIN" in s.send(b"EHLO client\r\n")
    assert answered(s.last(b"MAIL FROM:<alice@example.org>\r\n"), replies.AUTH_REQUIRED)
    assert answered(s.last(b"AUTH PLAIN " + plain("alice", ALICE_PASSWORD) + b"\r\n"), replies.AUTH_OK)


def test_implicit_tls_reads_nothing_before_handshake(tmp_path: Path) -> None:
    """On 465 nothing the client sends before the handshake is read as a command."""
    s = Session(tmp_path, role="submissions", implicit_tls=True)
    assert s.send(b"EHLO early\r\n") == []
    s.handshake()
    assert s.transport.value().decode().splitlines()[0] == "250-mx.example.org"


def test_mx_refuses_relay_even_after_ehlo_in_tls(tmp_path: Path) -> None:
    """TLS on the MX grants nothing: a remote recipient is still relay denied."""
    s = Session(tmp_path, role="mx")
    s.starttls()
    s.send(b"MAIL FROM:<x@example.net>\r\n")
    assert answered(s.last(b"RCPT TO:<bob@remote.example>\r\n"), replies.RELAY_DENIED)
    assert s.spooled() == []
