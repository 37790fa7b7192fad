"""SMTP server protocol, driven through an in-memory transport."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailappliance.delivery import commit_now
from mailappliance.smtp import replies
from mailappliance.smtp.server import SMTPConfig, SMTPFactory
from tests.replies import answered
from tests.subscribers import InMemoryDirectory


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
        self.directory = InMemoryDirectory()  # alice (alias postmaster@), bob, carol (disabled)
        self.directory.up = directory_up
        self.pending: list[Deferred] = []
        factory = SMTPFactory(self.config, self.directory.find_by_address, lambda job: maybeDeferred(commit_now, job),
                              clock=self.clock)
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.protocol.makeConnection(self.transport)

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
    assert lines[1].startswith(b"Delivered-To: ")
    assert lines[2].startswith(b"Received: from ")
    i = 3
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_greeting_and_ehlo_extensions(tmp_path: Path) -> None:
    """The MX greets with 220 and offers SIZE, 8BITMIME, PIPELINING, ENHANCEDSTATUSCODES, but no AUTH or STARTTLS."""
    h = Harness(tmp_path)
    assert h.transport.value().startswith(b"220 mx.example.org ESMTP")
    lines = h.send(b"EHLO client.example.net\r\n")
    assert lines[0] == "250-mx.example.org"
    assert "250-SIZE 10000" in lines
    assert {"250-8BITMIME", "250-PIPELINING", "250 ENHANCEDSTATUSCODES"} <= set(lines)
    assert not any("AUTH" in line or "STARTTLS" in line for line in lines)


def test_delivers_to_local_user_and_alias(smtp: Harness) -> None:
    """One message to a user, their alias and another user is stored once per mailbox, with our trace headers."""
    codes = smtp.codes(
        b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<Postmaster@Example.ORG>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    )
    assert codes == [250, 250, 250, 250, 354]
    reply = smtp.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply[0].startswith("250 2.0.0 Ok: queued as ")
    [alice] = smtp.messages("alice")  # alias and primary share one mailbox: stored once
    [bob] = smtp.messages("bob")
    assert b"\r\nDelivered-To: alice@example.org\r\n" in alice and b"\r\nDelivered-To: bob@example.org\r\n" in bob
    assert alice.replace(b"alice@example.org\r\nReceived", b"bob@example.org\r\nReceived") == bob
    assert body_of(alice) == b"Subject: hi\r\n\r\nhello\r\n"
    assert b"Return-Path: <sender@example.net>" in alice
    assert b"by mx.example.org (mailappliance) with ESMTP id" in alice
    assert not list((smtp.config.incoming_dir).iterdir())


def test_received_header_names_single_recipient(smtp: Harness) -> None:
    """The Received header names the client's HELO and address and, for one recipient, that recipient."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nx\r\n.\r\n")
    [stored] = smtp.messages("bob")
    assert b"for <bob@example.org>;" in stored
    assert b"from client.example.net (unknown [192.0.2.7])" in stored


def test_unknown_user_and_disabled_user(smtp: Harness) -> None:
    """RCPT for an unknown user gets 550 5.1.1, for a disabled one 550 5.2.1."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    assert answered(smtp.send(b"RCPT TO:<nobody@example.org>\r\n")[0], replies.UNKNOWN_USER)
    assert answered(smtp.send(b"RCPT TO:<carol@example.org>\r\n")[0], replies.MAILBOX_DISABLED)


def test_relay_refused(smtp: Harness) -> None:
    """A remote recipient is relay denied; percent hack, source route, literal, quoted and bang paths are rejected."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    assert answered(smtp.send(b"RCPT TO:<victim@remote.example>\r\n")[0], replies.RELAY_DENIED)
    for rcpt in (b"<user%remote.example@example.org>", b"<@example.org:victim@remote.example>",
                 b"<victim@[192.0.2.1]>", b'<"victim@remote.example"@example.org>',
                 b"<remote.example!victim@example.org>"):
        reply = smtp.send(b"RCPT TO:" + rcpt + b"\r\n")[0]
        assert answered(reply, replies.RECIPIENT_REJECTED), (rcpt, reply)
    assert answered(smtp.send(b"DATA\r\n")[0], replies.NO_VALID_RECIPIENTS)


def test_directory_down_is_temporary(tmp_path: Path) -> None:
    """With the directory down, RCPT for a local user gets 451 4.3.0, never a 5xx."""
    h = Harness(tmp_path, directory_up=False)
    h.send(b"EHLO c\r\n")
    mail, rcpt = h.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    assert answered(mail, replies.SENDER_OK) and answered(rcpt, replies.TEMP_LOOKUP_FAILURE)


def test_pipelined_commands_answered_in_order(smtp: Harness) -> None:
    """A pipelined transaction is answered command by command, in order, and the message stored."""
    codes = smtp.codes(
        b"RSET\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\nline\r\n.\r\nNOOP\r\nQUIT\r\n"
    )
    assert codes == [250, 250, 550, 250, 354, 250, 250, 221]
    assert len(smtp.messages("alice")) == 1


def test_pipelined_replies_leave_in_one_write(smtp: Harness) -> None:
    """MAIL, RCPT and DATA sent together get their three replies in one write (RFC 2920 lets
    the server hold replies while later commands are already here); a lone command's reply is
    written at once."""
    writes: list[bytes] = []
    write = smtp.transport.write
    smtp.transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert [w[:3] for w in writes] == [b"250"] and writes[0].count(b"\r\n") == 3 and b"354 " in writes[0]
    writes.clear()
    smtp.send(b"line\r\n.\r\n")
    smtp.send(b"NOOP\r\n")
    assert [w[:3] for w in writes] == [b"250", b"250"]


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"RCPT TO:<alice@example.org>\r\n", replies.NEED_MAIL),
        (b"DATA\r\n", replies.NEED_MAIL),
        (b"MAIL FROM:<s@example.net>\r\nMAIL FROM:<s@example.net>\r\n", replies.NESTED_MAIL),
        (b"MAIL FROM:<s@example.net>\r\nDATA\r\n", replies.NO_VALID_RECIPIENTS),
        (b"MAIL FROM:s@example.net\r\n",
         replies.Reply(501, "5.1.7", "Bad sender address syntax: address must be enclosed in <>")),
        (b"MAIL FROM:<s@example.net> FOO=BAR\r\n", replies.Reply(555, "5.5.4", "Error: unsupported MAIL parameter")),
        (b"MAIL FROM:<s@example.net> SIZE=999999\r\n", replies.MESSAGE_TOO_BIG),
        (b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org.>\r\n",
         replies.Reply(501, "5.1.3", "Bad recipient address syntax: malformed address")),
        (b"BDAT 10\r\n", replies.NEED_MAIL),
        (b"XYZZY\r\n", replies.NOT_RECOGNIZED),
        (b"EHLO\r\n", replies.Reply(501, "5.5.4", "Syntax: EHLO hostname")),
    ],
)
def test_bad_sequences_and_syntax(smtp: Harness, commands: bytes, expected: replies.Reply) -> None:
    """Commands out of sequence or malformed get their exact reply code and enhanced status."""
    assert answered(smtp.send(commands)[-1], expected)


def test_mail_before_helo(tmp_path: Path) -> None:
    """MAIL before HELO/EHLO gets 503 5.5.1."""
    h = Harness(tmp_path)
    assert answered(h.send(b"MAIL FROM:<s@example.net>\r\n")[0], replies.NEED_HELO)


def test_null_sender_and_size_parameter_accepted(smtp: Harness) -> None:
    """MAIL FROM:<> with SIZE and BODY=8BITMIME is accepted."""
    assert smtp.codes(b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n") == [250]


def test_dot_stuffing_is_undone(smtp: Harness) -> None:
    """Dot-stuffed lines are stored with one leading dot removed."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    smtp.send(b"..leading dot\r\n..\r\n...\r\nlast\r\n.\r\n")
    [stored] = smtp.messages("alice")
    assert body_of(stored) == b".leading dot\r\n.\r\n..\r\nlast\r\n"


def test_data_split_across_many_writes(smtp: Harness) -> None:
    """A message arriving one byte per write is answered once and stored whole."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    payload = b"Subject: split\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(200)) + b"\r\n.\r\n"
    lines = [line for b in payload for line in smtp.send(bytes([b]))]
    assert len(lines) == 1 and lines[0].startswith("250 ")
    [stored] = smtp.messages("alice")
    assert body_of(stored) == payload[:-3]


def test_oversize_message_refused_and_nothing_stored(smtp: Harness) -> None:
    """A message over the size limit gets 552 5.3.4, nothing is stored and the session goes on."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    reply = smtp.send(b"x" * 900 + b"\r\n" * 20 + (b"y" * 900 + b"\r\n") * 20 + b".\r\n")
    assert answered(reply[0], replies.MESSAGE_TOO_BIG)
    assert smtp.messages("alice") == []
    assert smtp.codes(b"NOOP\r\n") == [250]  # the session survives


def test_overlong_command_line(smtp: Harness) -> None:
    """A command line over the limit gets 500 5.5.2 and the session goes on."""
    assert answered(smtp.send(b"NOOP " + b"a" * 10_000 + b"\r\n")[0], replies.LINE_TOO_LONG)
    assert smtp.codes(b"NOOP\r\n") == [250]


def test_overlong_command_line_in_pieces_is_not_buffered_forever(smtp: Harness) -> None:
    """An endless command line arriving in pieces is not buffered past the limit, then gets 500 5.5.2."""
    for _ in range(100):
        smtp.send(b"a" * 1000)
    assert len(smtp.protocol.input) <= 5000
    assert answered(smtp.send(b"\r\n")[0], replies.LINE_TOO_LONG)


def test_overlong_data_line_refused(smtp: Harness) -> None:
    """A message line over 998 octets gets 550 5.6.0 and nothing is stored."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert smtp.send(b"z" * 999 + b"\r\n.\r\n")[0].startswith("550 5.6.0 Error: message has a line longer than ")
    assert smtp.messages("alice") == []


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\r"],
)
def test_smtp_smuggling_never_ends_message_early(smtp: Harness, smuggle: bytes) -> None:
    """A bare CR or LF around a dot never ends DATA: the message is refused whole and no smuggled one is stored."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    injected = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nevil\r\n"
    lines = smtp.send(b"Subject: a\r\n\r\nbody" + smuggle + injected + b".\r\n")
    assert len(lines) == 1 and answered(lines[0], replies.BARE_LINE_ENDING), lines
    assert smtp.messages("alice") == [] and smtp.messages("bob") == []


def test_postmaster_without_domain_is_accepted(smtp: Harness) -> None:
    """RCPT TO:<Postmaster> without a domain is accepted (RFC 5321 4.5.1)."""
    assert smtp.codes(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<Postmaster>\r\n") == [250, 250]


def test_too_many_errors_closes(tmp_path: Path) -> None:
    """More bad commands than max_errors end the session with 421 4.7.0."""
    h = Harness(tmp_path)
    h.send(b"BAD\r\n" * 60)
    assert h.transport.disconnecting
    assert answered(h.transport.value().decode().splitlines()[-1], replies.TOO_MANY_ERRORS)


def test_storage_failure_is_temporary(smtp: Harness, tmp_path: Path) -> None:
    """A Maildir that cannot be written gets 451 4.3.0 and leaves nothing in incoming/."""
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice").write_text("not a directory")
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert answered(smtp.send(b"hello\r\n.\r\n")[0], replies.DELIVERY_FAILED)
    assert not list(smtp.config.incoming_dir.iterdir())


def test_quit(smtp: Harness) -> None:
    """QUIT gets 221 2.0.0 and closes the connection."""
    assert smtp.send(b"QUIT\r\n") == ["221 2.0.0 Bye"]
    assert smtp.transport.disconnecting


def test_normalize_option_turns_bare_line_endings_into_crlf(tmp_path: Path) -> None:
    """With normalize_line_endings, bare CR and LF become CRLF, and LF dot LF does not end the message."""
    h = Harness(tmp_path, normalize=True)
    h.send(b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    lines = h.send(b"Subject: a\r\n\r\none\ntwo\rthree\n.\nfour\r\n..five\r\n.\r\n")
    assert len(lines) == 1 and lines[0].startswith("250 ")  # "\n.\n" did not end the message
    [stored] = h.messages("alice")
    assert body_of(stored) == b"Subject: a\r\n\r\none\r\ntwo\r\nthree\r\n.\r\nfour\r\n.five\r\n"


def test_slow_drip_command_is_cut_off(smtp: Harness) -> None:
    """A command dripped a byte at a time past the command time limit gets 421 4.4.2, and never runs."""
    lines = []
    for byte in b"NOOP\r\n":
        smtp.clock.advance(25)  # always well inside the idle timeout
        lines += smtp.send(bytes([byte]))
    assert lines == ["421 4.4.2 mx.example.org Error: timeout exceeded"]  # the NOOP never ran
    assert smtp.transport.disconnecting


def test_slow_drip_data_is_cut_off(smtp: Harness) -> None:
    """DATA dripped past the data time limit gets 421 4.4.2 and nothing is stored."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    lines = []
    for _ in range(30):
        smtp.clock.advance(25)
        lines += smtp.send(b"line\r\n")
    assert lines == ["421 4.4.2 mx.example.org Error: timeout exceeded"]
    assert smtp.transport.disconnecting
    assert smtp.messages("alice") == []
