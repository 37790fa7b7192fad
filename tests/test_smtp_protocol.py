"""SMTP server protocol, driven through an in-memory transport."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.delivery import commit_now
from mailappliance.smtp.server import SMTPConfig, SMTPFactory

ALICE = Subscriber(dn="uid=alice,ou=people,dc=example,dc=org", uid="alice", mail="alice@example.org",
                   aliases=("postmaster@example.org",))
BOB = Subscriber(dn="uid=bob,ou=people,dc=example,dc=org", uid="bob", mail="bob@example.org")
CAROL = Subscriber(dn="uid=carol,ou=people,dc=example,dc=org", uid="carol", mail="carol@example.org",
                   disabled=True)
DIRECTORY = {a: s for s in (ALICE, BOB, CAROL) for a in s.addresses}


class Harness:
    """One SMTP session on a StringTransport; lookups and storage are synchronous."""

    def __init__(self, tmp_path: Path, directory_up: bool = True, max_size: int = 10_000,
                 normalize: bool = False) -> None:
        self.root = tmp_path / "mail"
        self.config = SMTPConfig(
            hostname="mx.example.org", role="mx", local_domains=frozenset({"example.org"}),
            maildir_root=self.root, incoming_dir=tmp_path / "incoming", max_message_size=max_size,
            max_errors=50, normalize_line_endings=normalize, command_time_limit=60, data_time_limit=600,
        )
        self.clock = Clock()
        self.config.incoming_dir.mkdir()
        self.directory_up = directory_up
        self.pending: list[Deferred] = []
        factory = SMTPFactory(self.config, self.find, lambda job: maybeDeferred(commit_now, job), clock=self.clock)
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol.makeConnection(self.transport)

    def find(self, address: str) -> Deferred:
        if not self.directory_up:
            return fail(DirectoryUnavailable("ldap down"))
        return succeed(DIRECTORY.get(address))

    def send(self, data: bytes) -> list[str]:
        """Send raw bytes; return the reply lines they produced."""
        self.transport.clear()
        self.protocol.dataReceived(data)
        return self.transport.value().decode().splitlines()

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.send(data) if line[3:4] == " "]

    def messages(self, uid: str) -> list[bytes]:
        new = self.root / uid / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


@pytest.fixture
def smtp(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    h.send(b"EHLO client.example.net\r\n")
    return h


def body_of(stored: bytes) -> bytes:
    """The message as the client sent it, without our trace headers."""
    lines = stored.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path: <")
    assert lines[1].startswith(b"Received: from ")
    i = 2
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_greeting_and_ehlo_extensions(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.transport.value().startswith(b"220 mx.example.org ESMTP")
    lines = h.send(b"EHLO client.example.net\r\n")
    assert lines[0] == "250-mx.example.org"
    assert "250-SIZE 10000" in lines
    assert {"250-8BITMIME", "250-PIPELINING", "250 ENHANCEDSTATUSCODES"} <= set(lines)
    assert not any("AUTH" in line or "STARTTLS" in line for line in lines)


def test_delivers_to_local_user_and_alias(smtp: Harness) -> None:
    codes = smtp.codes(
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<Postmaster@Example.ORG>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    )
    assert codes == [250, 250, 250, 250, 354]
    reply = smtp.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply[0].startswith("250 2.0.0 Ok: queued as ")
    [alice] = smtp.messages("alice")  # alias and primary share one mailbox: stored once
    [bob] = smtp.messages("bob")
    assert alice == bob
    assert body_of(alice) == b"Subject: hi\r\n\r\nhello\r\n"
    assert b"Return-Path: <sender@example.net>" in alice
    assert b"by mx.example.org (mailappliance) with ESMTP id" in alice
    assert not list((smtp.config.incoming_dir).iterdir())


def test_received_header_names_single_recipient(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nx\r\n.\r\n")
    [stored] = smtp.messages("bob")
    assert b"for <bob@example.org>;" in stored
    assert b"from client.example.net ([192.0.2.7])" in stored


def test_unknown_user_and_disabled_user(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    assert smtp.send(b"RCPT TO:<nobody@example.org>\r\n")[0].startswith("550 5.1.1 ")
    assert smtp.send(b"RCPT TO:<carol@example.org>\r\n")[0].startswith("550 5.2.1 ")


def test_relay_refused(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    for rcpt in (b"<victim@remote.example>", b"<user%remote.example@example.org>",
                 b"<@example.org:victim@remote.example>", b"<victim@[192.0.2.1]>",
                 b'<"victim@remote.example"@example.org>', b"<remote.example!victim@example.org>"):
        reply = smtp.send(b"RCPT TO:" + rcpt + b"\r\n")[0]
        assert reply.startswith("554 5.7.1 "), (rcpt, reply)
    assert smtp.codes(b"DATA\r\n") == [554]


def test_directory_down_is_temporary(tmp_path: Path) -> None:
    h = Harness(tmp_path, directory_up=False)
    h.send(b"EHLO c\r\n")
    assert h.codes(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n") == [250, 451]


def test_pipelined_commands_answered_in_order(smtp: Harness) -> None:
    codes = smtp.codes(
        b"RSET\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\nline\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    assert codes == [250, 250, 550, 250, 354, 250, 250, 221]
    assert len(smtp.messages("alice")) == 1


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"RCPT TO:<alice@example.org>\r\n", "503 5.5.1"),
        (b"DATA\r\n", "503 5.5.1"),
        (b"MAIL FROM:<s@example.net>\r\nMAIL FROM:<s@example.net>\r\n", "503 5.5.1"),
        (b"MAIL FROM:<s@example.net>\r\nDATA\r\n", "554 5.5.1"),
        (b"MAIL FROM:s@example.net\r\n", "501 5.1.7"),
        (b"MAIL FROM:<s@example.net> FOO=BAR\r\n", "555 5.5.4"),
        (b"MAIL FROM:<s@example.net> SIZE=999999\r\n", "552 5.3.4"),
        (b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org.>\r\n", "501 5.1.3"),
        (b"BDAT 10\r\n", "502 5.5.1"),
        (b"XYZZY\r\n", "500 5.5.2"),
        (b"EHLO\r\n", "501 5.5.4"),
    ],
)
def test_bad_sequences_and_syntax(smtp: Harness, commands: bytes, expected: str) -> None:
    assert smtp.send(commands)[-1].startswith(expected)


def test_mail_before_helo(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.send(b"MAIL FROM:<s@example.net>\r\n")[0].startswith("503 5.5.1")


def test_null_sender_and_size_parameter_accepted(smtp: Harness) -> None:
    assert smtp.codes(b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n") == [250]


def test_dot_stuffing_is_undone(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    smtp.send(b"..leading dot\r\n..\r\n...\r\nlast\r\n.\r\n")
    [stored] = smtp.messages("alice")
    assert body_of(stored) == b".leading dot\r\n.\r\n..\r\nlast\r\n"


def test_data_split_across_many_writes(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    payload = b"Subject: split\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(200)) + b"\r\n.\r\n"
    replies = [line for b in payload for line in smtp.send(bytes([b]))]
    assert len(replies) == 1 and replies[0].startswith("250 ")
    [stored] = smtp.messages("alice")
    assert body_of(stored) == payload[:-3]


def test_oversize_message_refused_and_nothing_stored(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    reply = smtp.send(b"x" * 900 + b"\r\n" * 20 + (b"y" * 900 + b"\r\n") * 20 + b".\r\n")
    assert reply[0].startswith("552 5.3.4")
    assert smtp.messages("alice") == []
    assert smtp.codes(b"NOOP\r\n") == [250]  # the session survives


def test_overlong_command_line(smtp: Harness) -> None:
    assert smtp.send(b"NOOP " + b"a" * 10_000 + b"\r\n")[0].startswith("500 5.5.2")
    assert smtp.codes(b"NOOP\r\n") == [250]


def test_overlong_command_line_in_pieces_is_not_buffered_forever(smtp: Harness) -> None:
    for _ in range(100):
        smtp.send(b"a" * 1000)
    assert len(smtp.protocol.input) <= 5000
    assert smtp.send(b"\r\n")[0].startswith("500 5.5.2")


def test_overlong_data_line_refused(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert smtp.send(b"z" * 999 + b"\r\n.\r\n")[0].startswith("550 5.6.0")
    assert smtp.messages("alice") == []


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r"],
)
def test_smtp_smuggling_never_ends_message_early(smtp: Harness, smuggle: bytes) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    injected = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nevil\r\n"
    replies = smtp.send(b"Subject: a\r\n\r\nbody" + smuggle + injected + b".\r\n")
    assert len(replies) == 1 and replies[0].startswith("550 5.6.0"), replies
    assert smtp.messages("alice") == [] and smtp.messages("bob") == []


def test_postmaster_without_domain_is_accepted(smtp: Harness) -> None:
    assert smtp.codes(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<Postmaster>\r\n") == [250, 250]


def test_too_many_errors_closes(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.send(b"BAD\r\n" * 60)
    assert h.transport.disconnecting
    assert b"421 4.7.0" in h.transport.value()


def test_storage_failure_is_temporary(smtp: Harness, tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice").write_text("not a directory")
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert smtp.send(b"hello\r\n.\r\n")[0].startswith("451 4.3.0")
    assert not list(smtp.config.incoming_dir.iterdir())


def test_quit(smtp: Harness) -> None:
    assert smtp.send(b"QUIT\r\n") == ["221 2.0.0 Bye"]
    assert smtp.transport.disconnecting


def test_normalize_option_turns_bare_line_endings_into_crlf(tmp_path: Path) -> None:
    h = Harness(tmp_path, normalize=True)
    h.send(b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    replies = h.send(b"Subject: a\r\n\r\none\ntwo\rthree\n.\nfour\r\n..five\r\n.\r\n")
    assert len(replies) == 1 and replies[0].startswith("250 ")  # "\n.\n" did not end the message
    [stored] = h.messages("alice")
    assert body_of(stored) == b"Subject: a\r\n\r\none\r\ntwo\r\nthree\r\n.\r\nfour\r\n.five\r\n"


def test_slow_drip_command_is_cut_off(smtp: Harness) -> None:
    replies = []
    for byte in b"NOOP\r\n":
        smtp.clock.advance(25)  # always well inside the idle timeout
        replies += smtp.send(bytes([byte]))
    assert replies == ["421 4.4.2 mx.example.org Error: timeout exceeded"]  # the NOOP never ran
    assert smtp.transport.disconnecting


def test_slow_drip_data_is_cut_off(smtp: Harness) -> None:
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    replies = []
    for _ in range(30):
        smtp.clock.advance(25)
        replies += smtp.send(b"line\r\n")
    assert replies == ["421 4.4.2 mx.example.org Error: timeout exceeded"]
    assert smtp.transport.disconnecting
    assert smtp.messages("alice") == []
