"""DSN and SMTPUTF8 parameters as attack surface: no header or report line can be
planted through ENVID or ORCPT, parameters cannot be repeated to slip past a check,
and UTF-8 address forms open no relay (U-label domains, look-alike characters,
fullwidth '@', IDN homographs of our own domains)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailappliance.queue.dsn import build_dsn, recipient_status
from mailappliance.smtp import replies
from tests.replies import answered
from tests.test_smtp_protocol import Harness


@pytest.fixture
def smtp(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    h.send(b"EHLO client.example.net\r\n")
    return h


@pytest.mark.parametrize("mail", [
    b"MAIL FROM:<s@example.net> ENVID=a+0D+0ASubject:+20x",  # CR LF hidden in xtext
    b"MAIL FROM:<s@example.net> ENVID=" + b"x" * 101,
    b"MAIL FROM:<s@example.net> RET=FULL RET=HDRS",
    b"MAIL FROM:<s@example.net> SIZE=1 SIZE=999999999",  # the second SIZE must not win
])
def test_bad_mail_parameters_are_refused(smtp: Harness, mail: bytes) -> None:
    """Encoded line breaks, overlong ENVID and repeated parameters get 501, nothing else happens."""
    assert smtp.send(mail + b"\r\n")[0].startswith("501 5.5.4 ")
    assert smtp.protocol.transaction is None


@pytest.mark.parametrize("rcpt", [
    b"RCPT TO:<alice@example.org> ORCPT=rfc822;a+0D+0AX-Injected:+20yes",
    b"RCPT TO:<alice@example.org> ORCPT=utf-8;a\\x{D}\\x{A}X-Injected:",
    b"RCPT TO:<alice@example.org> ORCPT=x400;abc",
    b"RCPT TO:<alice@example.org> NOTIFY=NEVER NOTIFY=SUCCESS",
])
def test_bad_rcpt_parameters_are_refused(smtp: Harness, rcpt: bytes) -> None:
    """ORCPT cannot carry a line break in either encoding; NOTIFY cannot be given twice."""
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    assert smtp.send(rcpt + b"\r\n")[0].startswith("501 5.5.4 ")
    assert not smtp.protocol.transaction.recipient_count


def test_a_report_never_carries_a_line_break_from_stored_values() -> None:
    """Even a damaged envelope (a stored ORCPT or ENVID with CR LF) cannot add a field to a report."""
    report = build_dsn(reporting_host="mx.example.org", original_sender="a@example.org", queue_id="q",
                       arrival_date=0, original_message=b"Subject: x\r\n\r\n", envid="e\r\nX-Evil: 1",
                       statuses=[recipient_status("b@x.example", "failed", 550, "5.1.1 no\r\nX-Evil: 2", "",
                                                  "rfc822; b@x.example\r\nX-Evil: 3")])
    assert b"\r\nX-Evil" not in report


@pytest.mark.parametrize("rcpt", [
    "victim@rémote.example",  # a U-label domain that is not ours
    "alice@exаmple.org",  # Cyrillic 'а': an IDN homograph of example.org, another domain
    "victim＠remote.example@example.org",  # fullwidth '@' is a character of the local part, not a route
    "victim%remote.example@exämple.org",
])
def test_utf8_forms_open_no_relay(smtp: Harness, rcpt: str) -> None:
    """Unauthenticated, with SMTPUTF8: UTF-8 forms of remote or look-alike domains are relay denied
    (or unknown users of ours), never queued for elsewhere."""
    smtp.send(b"MAIL FROM:<s@example.net> SMTPUTF8\r\n")
    answer = smtp.send(f"RCPT TO:<{rcpt}>\r\n".encode())[0]
    assert answer.startswith(("554 5.7.1 ", "550 5.1.1 ")), answer
    assert not smtp.protocol.transaction.recipient_count


def test_utf8_command_bytes_that_are_not_utf8_are_refused(smtp: Harness) -> None:
    """Invalid UTF-8 in an address (decoded as U+FFFD) is a syntax error, not a new address."""
    smtp.send(b"MAIL FROM:<s@example.net> SMTPUTF8\r\n")
    assert smtp.send(b"RCPT TO:<al\xffice@example.org>\r\n")[0].startswith("501 5.1.3 ")
    assert answered(smtp.send(b"RCPT TO:<alice@example.org>\r\n")[0], replies.RECIPIENT_OK)
