"""Finding 12 (protocol parts): verbs are ASCII, AUTH exchanges cannot be
confused by long lines, TLS forgets an earlier login, BDAT payloads are never
commands (tests/hostile/test_chunking.py has the rest of BDAT), and the MX does not
take passwords unless the admin says so."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path
from typing import Callable

import attrs
import pytest

from mailappliance.smtp import replies
from tests.daemon import Appliance
from tests.test_smtp_auth import Session, plain
from tests.test_smtp_protocol import Harness


def reply_of(reply: replies.Reply) -> str:
    return f"{reply.code} {reply.status}"


@pytest.mark.parametrize("line", ["maıl FROM:<s@example.net>", "ſTARTTLS", "EHLO\u2028x", "NOOP\x00"])
def test_verbs_that_only_uppercase_to_a_command_are_not_commands(tmp_path: Path, line: str) -> None:
    """'ı'.upper() is 'I' and 'ſ'.upper() is 'S': such verbs get 500, as any unknown verb."""
    smtp = Harness(tmp_path)
    smtp.send(b"EHLO client.example.net\r\n")
    assert smtp.send(line.encode() + b"\r\n")[-1].startswith(reply_of(replies.NOT_RECOGNIZED))


def test_an_overlong_line_inside_auth_cancels_the_exchange(tmp_path: Path) -> None:
    """RFC 4954: 500 5.5.6, and the next line is a command again, not a SASL response."""
    session = Session(tmp_path)
    session.starttls()
    assert session.last(b"AUTH LOGIN\r\n").startswith("334 ")
    assert session.last(b"A" * 5000 + b"\r\n").startswith(reply_of(replies.AUTH_LINE_TOO_LONG))
    assert session.last(b"NOOP\r\n") == "250 2.0.0 Ok"


def test_starttls_forgets_an_earlier_login(tmp_path: Path) -> None:
    """RFC 3207 4.2: after STARTTLS the client is nobody until it logs in again inside TLS."""
    session = Session(tmp_path)
    session.protocol.config = attrs.evolve(session.protocol.config, allow_plaintext_auth=True)
    session.send(b"EHLO client\r\n")
    assert session.last(b"AUTH PLAIN " + plain("alice", "alice-password") + b"\r\n").startswith("235 ")
    assert session.last(b"STARTTLS\r\n") == "220 2.0.0 Ready to start TLS"
    session.handshake()
    assert any(line[4:] == "AUTH PLAIN LOGIN" for line in session.send(b"EHLO client\r\n"))
    assert session.last(b"MAIL FROM:<alice@example.org>\r\n").startswith(reply_of(replies.AUTH_REQUIRED))


def test_a_bdat_chunk_is_message_text_not_commands(tmp_path: Path) -> None:
    """A BDAT chunk is the message: 'QUIT' lines inside it are stored, never executed (RFC 3030;
    more in test_chunking.py)."""
    smtp = Harness(tmp_path)
    smtp.send(b"EHLO client.example.net\r\n")
    chunk = b"QUIT\r\nQUIT\r\nQUIT\r\n"
    lines = smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"
                      b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert lines[-2].startswith("250 2.0.0 Ok: queued as ")
    assert lines[-1] == "250 2.0.0 Ok"
    assert not smtp.transport.disconnecting
    [stored] = smtp.messages("alice")
    assert stored.endswith(b"\r\n" + chunk)
    assert smtp.send(b"DATA\r\n")[-1].startswith(reply_of(replies.NEED_MAIL))  # LAST ended the transaction


def test_a_bdat_size_that_cannot_be_read_ends_the_session(tmp_path: Path) -> None:
    """Without a size nobody knows where the chunk ends: 421 and close, nothing executed."""
    smtp = Harness(tmp_path)
    smtp.send(b"EHLO client.example.net\r\n")
    assert smtp.send(b"BDAT lots\r\nQUIT\r\n") == [
        "421 4.5.0 mx.example.org Error: cannot read BDAT size"]
    assert smtp.transport.disconnecting


def test_the_mx_offers_no_auth_even_inside_tls(appliance: Callable[..., Appliance]) -> None:
    """Port 25 is not a password-guessing door: no AUTH in EHLO after STARTTLS, and AUTH gets 502."""
    instance = appliance()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo("client.example.net")
        assert "auth" not in smtp.esmtp_features
        code, text = smtp.docmd("AUTH", "PLAIN " + plain("alice", "whatever").decode())
        assert (code, text[:5]) == (replies.NOT_IMPLEMENTED.code, replies.NOT_IMPLEMENTED.status.encode())
