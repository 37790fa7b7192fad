"""RCPT through the address plan, driven through an in-memory transport: what lands in which
Maildir and in the outbound spool (forwarded copies with their SRS sender), what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailappliance.addressing import Addressing
from mailappliance.delivery import commit_now
from mailappliance.directory import Subscriber
from mailappliance.queue.spool import OutboundSpool
from mailappliance.smtp import replies
from mailappliance.smtp.server import SMTPConfig, SMTPFactory
from mailappliance.srs import Srs, SrsKeys
from tests.replies import answered
from tests.subscribers import InMemoryDirectory

NOW = 1_700_000_000.0
SRS = Srs(SrsKeys(b"0123456789abcdef0123456789abcdef"), "example.org")
ALICE = Subscriber(dn="uid=alice", uid="alice", mail="alice@example.org")
BOB = Subscriber(dn="uid=bob", uid="bob", mail="bob@example.org",
                 forwards=("bob@remote.example", "alice@example.com", "bob@example.org"))
CAROL = Subscriber(dn="uid=carol", uid="carol", mail="carol@example.org", forwards=("carol@remote.example",))


class Session:
    """One MX session with alias domain example.com, sub-addresses, SRS and an outbound spool."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "mail"
        self.spool = OutboundSpool(tmp_path / "spool")
        addressing = Addressing(local_domains=frozenset({"example.org"}), alias_domains={"example.com": "example.org"},
                                delimiter="+", srs=SRS, first_domain="example.org")
        config = SMTPConfig(hostname="mx.example.org", role="mx", local_domains=frozenset({"example.org"}),
                            maildir_root=self.root, incoming_dir=tmp_path / "incoming", max_message_size=100_000,
                            max_errors=50, addressing=addressing)
        config.incoming_dir.mkdir()
        clock = Clock()
        clock.advance(NOW)
        directory = InMemoryDirectory((ALICE, BOB, CAROL), passwords={})
        factory = SMTPFactory(config, directory.find_by_address, lambda job: maybeDeferred(commit_now, job),
                              spool=self.spool, clock=clock)
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol.makeConnection(self.transport)
        self.send(b"EHLO mx.sender.example\r\n")

    def send(self, data: bytes) -> list[str]:
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value().decode().splitlines()

    def mailbox(self, uid: str, folder: str = "") -> list[bytes]:
        new = self.root / uid / folder / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(tmp_path)


def test_forwarding_splits_into_mailboxes_and_one_srs_spool_entry(session: Session) -> None:
    """bob keeps a copy, alice (a local forward, alias-domain form) gets one, bob@remote.example and
    carol@remote.example share one spool envelope <id>.fwd whose sender is SRS0 in our domain."""
    lines = session.send(b"MAIL FROM:<eve@sender.example>\r\nRCPT TO:<bob@example.com>\r\n"
                         b"RCPT TO:<carol@example.org>\r\nDATA\r\n")
    assert [line[:3] for line in lines] == ["250", "250", "250", "354"]
    lines = session.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert lines[0].startswith("250 2.0.0 Ok: queued as ")
    queue_id = lines[0].rsplit(" ", 1)[1]
    assert len(session.mailbox("bob")) == 1 and len(session.mailbox("alice")) == 1 and session.mailbox("carol") == []
    [forwarded] = session.spool.queued_ids()
    assert forwarded == queue_id + ".fwd"
    envelope = session.spool.envelope(forwarded)
    assert [r.address for r in envelope.recipients] == ["bob@remote.example", "carol@remote.example"]
    assert envelope.sender.startswith("SRS0=") and envelope.sender.endswith("@example.org")
    assert SRS.reverse(envelope.sender.rpartition("@")[0], NOW) == "eve@sender.example"
    sent = session.spool.message_path(forwarded).read_bytes()[envelope.body_offset:]
    assert sent.startswith(b"Received: from mx.sender.example") and sent.endswith(b"hello\r\n")


def test_sub_address_goes_to_an_existing_folder(session: Session) -> None:
    """alice+Lists@example.com is filed into alice's .lists folder; a tag with a '/' files into the inbox."""
    for sub in ("new", "cur", "tmp"):
        (session.root / "alice" / ".lists" / sub).mkdir(parents=True)
    for rcpt in (b"alice+Lists@example.com", b"alice+a/b@example.org"):
        lines = session.send(b"MAIL FROM:<eve@sender.example>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n")
        assert lines[-1].startswith("354")
        assert session.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")[0].startswith("250 ")
    assert len(session.mailbox("alice", ".lists")) == 1 and len(session.mailbox("alice")) == 1


def test_srs_bounce_is_relayed_with_the_null_sender(session: Session) -> None:
    """A bounce to our SRS0 address is queued to the original sender unchanged; a forged one is 550 5.1.1."""
    address = SRS.forward("eve@sender.example", NOW)
    assert address is not None
    lines = session.send(b"MAIL FROM:<>\r\nRCPT TO:<SRS0=AAAAAAAA=AA=sender.example=eve@example.org>\r\n"
                         b"RCPT TO:<" + address.encode() + b">\r\nDATA\r\n")
    assert answered(lines[1], replies.SRS_INVALID) and lines[2].startswith("250") and lines[3].startswith("354")
    assert session.send(b"Subject: bounce\r\n\r\nsorry\r\n.\r\n")[0].startswith("250 ")
    [queued] = session.spool.queued_ids()
    envelope = session.spool.envelope(queued)
    assert envelope.sender == "" and [r.address for r in envelope.recipients] == ["eve@sender.example"]
