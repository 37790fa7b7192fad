"""CHUNKING (RFC 3030) against hostile clients: BDAT octets are never commands,
the size limit, the line-ending rules (no BINARYMIME), the time limits and the
byte budget hold under BDAT as they do under DATA, and a transfer that does not
end properly leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from mailappliance.smtp import replies
from tests.daemon import Appliance
from tests.esmtp_client import RawSMTP
from tests.replies import answered
from tests.test_smtp_protocol import Harness

MAIL = b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n"


def bdat(chunk: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


@pytest.fixture
def smtp(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)  # max_message_size 10000
    h.send(b"EHLO client.example.net\r\n")
    return h


def nothing_left(h: Harness) -> bool:
    return not h.messages("alice") and not list(h.config.incoming_dir.iterdir())


def test_commands_inside_a_chunk_are_message_text(smtp: Harness) -> None:
    """'RCPT', 'QUIT' and a lone dot inside a chunk are stored as text; the session runs only what follows it."""
    chunk = b"Subject: x\r\n\r\nRCPT TO:<bob@example.org>\r\n.\r\nQUIT\r\n"
    lines = smtp.send(MAIL + bdat(chunk, last=True) + b"NOOP\r\n")
    assert lines[-2].startswith("250 2.0.0 Ok: queued as ") and lines[-1] == "250 2.0.0 Ok"
    [stored] = smtp.messages("alice")
    assert stored.endswith(chunk) and not smtp.messages("bob")
    assert not smtp.transport.disconnecting


def test_refused_bdat_octets_are_skipped_not_executed(smtp: Harness) -> None:
    """BDAT without MAIL gets 503 and its octets are skipped: 'QUIT' inside does nothing."""
    lines = smtp.send(bdat(b"QUIT\r\nQUIT\r\n", last=True) + b"NOOP\r\n")
    assert answered(lines[0], replies.NEED_MAIL) and lines[1] == "250 2.0.0 Ok"
    assert not smtp.transport.disconnecting


@pytest.mark.parametrize("argument", [b"lots", b"-1", b"1 FIRST", b"1 LAST x", b"", b"1" * 21, "１".encode()])
def test_a_bdat_size_that_cannot_be_read_ends_the_session(smtp: Harness, argument: bytes) -> None:
    """Without a size nobody knows where the chunk ends: 421 and close, nothing after it executed."""
    assert smtp.send(MAIL + b"BDAT " + argument + b"\r\nQUIT\r\n")[-1] == \
        "421 4.5.0 mx.example.org Error: cannot read BDAT size"
    assert smtp.transport.disconnecting and nothing_left(smtp)


def test_bare_lf_and_bare_cr_in_a_chunk_refuse_the_message(smtp: Harness) -> None:
    """No BINARYMIME: a bare LF or CR in BDAT content is SMTP smuggling material, refused 550 5.6.0 at LAST."""
    for content in (b"Subject: x\r\n\r\nline\nMAIL FROM:<x@y>\r\n", b"Subject: x\r\n\r\nline\r.\r\n",
                    b"Subject: x\r\n\r\nends in a lone CR\r"):
        lines = smtp.send(MAIL + bdat(content, last=True))
        assert answered(lines[-1], replies.BARE_LINE_ENDING), content
    assert nothing_left(smtp)


def test_binarymime_is_refused_at_mail(smtp: Harness) -> None:
    """BODY=BINARYMIME is not offered, so MAIL with it is refused (501) and EHLO does not list it."""
    assert not any("BINARYMIME" in line for line in smtp.send(b"EHLO c\r\n"))
    assert smtp.send(b"MAIL FROM:<s@example.net> BODY=BINARYMIME\r\n")[0].startswith("501 5.5.4 ")


def test_crlf_split_between_chunks_is_not_bare(smtp: Harness) -> None:
    """A chunk boundary between CR and LF is one CRLF: the message is stored, not refused."""
    lines = smtp.send(MAIL + bdat(b"Subject: x\r") + bdat(b"\n\r\nbody\r") + bdat(b"\n", last=True))
    assert lines[-1].startswith("250 2.0.0 Ok: queued as ")
    [stored] = smtp.messages("alice")
    assert stored.endswith(b"Subject: x\r\n\r\nbody\r\n")


def test_a_chunk_past_the_size_limit_is_refused_when_announced(smtp: Harness) -> None:
    """6000 + 6000 octets with a limit of 10000: the second BDAT gets 552 5.3.4, its octets are skipped,
    the transaction is over (a further BDAT gets 503) and the session goes on."""
    lines = smtp.send(MAIL + bdat(b"x" * 5998 + b"\r\n") + bdat(b"y" * 5998 + b"\r\n") + bdat(b"z\r\n", True)
                      + b"NOOP\r\n")
    assert lines[-4].startswith("250 2.0.0 Ok: 6000 octets")
    assert answered(lines[-3], replies.MESSAGE_TOO_BIG)
    assert answered(lines[-2], replies.NEED_MAIL)
    assert lines[-1] == "250 2.0.0 Ok"
    assert nothing_left(smtp)


def test_a_chunk_bigger_than_any_message_ends_the_session(smtp: Harness) -> None:
    """A declared chunk larger than the whole limit is not read (and thrown away) for hours: 552 and close."""
    lines = smtp.send(MAIL + b"BDAT 99999999999999999999 LAST\r\nxxxx")
    assert answered(lines[-1], replies.MESSAGE_TOO_BIG)
    assert smtp.transport.disconnecting and nothing_left(smtp)


def test_a_declared_size_that_never_arrives_times_out_and_keeps_nothing(smtp: Harness) -> None:
    """BDAT 5000 with 10 octets sent, then silence: the idle timeout ends it (421), nothing is kept."""
    smtp.send(MAIL + b"BDAT 5000 LAST\r\n0123456789")
    smtp.transport.clear()
    smtp.clock.advance(smtp.config.idle_timeout + 1)
    assert smtp.transport.value().startswith(b"421 4.4.2 ")
    smtp.protocol.connectionLost(None)
    assert nothing_left(smtp)


def test_a_chunked_message_dripping_in_is_cut_at_the_data_time_limit(smtp: Harness) -> None:
    """One octet every 25 s keeps the idle timer happy, but data_time_limit (600 s) still ends the transfer."""
    smtp.send(MAIL + b"BDAT 1000 LAST\r\n")
    for _ in range(30):
        smtp.clock.advance(25)
        if smtp.send(b"x"):
            break
    assert smtp.transport.value().startswith(b"421 4.4.2 ") and smtp.transport.disconnecting


def test_last_missing_then_quit_keeps_nothing(smtp: Harness) -> None:
    """Chunks without LAST, then QUIT: 221 and no message anywhere."""
    lines = smtp.send(MAIL + bdat(b"Subject: x\r\n\r\nbody\r\n") + b"QUIT\r\n")
    assert lines[-2].startswith("250 2.0.0 Ok: ") and lines[-1].startswith("221 ")
    smtp.protocol.connectionLost(None)
    assert nothing_left(smtp)


def test_data_after_bdat_is_refused_and_ends_the_transaction(smtp: Harness) -> None:
    """BDAT then DATA in one transaction: 503; the message text after it is not read as a message."""
    lines = smtp.send(MAIL + bdat(b"Subject: x\r\n") + b"DATA\r\nRCPT TO:<bob@example.org>\r\n")
    assert lines[-2].startswith("503 5.5.1 ") and answered(lines[-1], replies.NEED_MAIL)
    assert nothing_left(smtp)
    assert smtp.codes(MAIL + bdat(b"ok\r\n", last=True)) == [250, 250, 250]  # the session still works


def test_rcpt_after_bdat_is_refused(smtp: Harness) -> None:
    """Our trace fields name the recipients when the first chunk arrives: RCPT after it is 503."""
    lines = smtp.send(MAIL + bdat(b"Subject: x\r\n") + b"RCPT TO:<bob@example.org>\r\n")
    assert lines[-1].startswith("503 5.5.1 ") and nothing_left(smtp)


def test_bdat_needs_ehlo(tmp_path: Path) -> None:
    """CHUNKING is an ESMTP extension: after HELO, BDAT gets 503 and its octets are skipped."""
    h = Harness(tmp_path)
    h.send(b"HELO client.example.net\r\n")
    lines = h.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n" + bdat(b"NOOP\r\n", True))
    assert answered(lines[-1], replies.NEED_EHLO)


def test_overlong_line_in_a_chunk_is_refused(smtp: Harness) -> None:
    """A 2000-octet line in BDAT content is refused like in DATA (550 5.6.0)."""
    lines = smtp.send(MAIL + bdat(b"Subject: x\r\n\r\n" + b"a" * 2000 + b"\r\n", last=True))
    assert lines[-1].startswith("550 5.6.0 ") and nothing_left(smtp)


def test_hop_count_holds_under_bdat(smtp: Harness) -> None:
    """51 Received fields in a chunked header: 554 5.4.6, as with DATA (a mail loop)."""
    header = b"".join(b"Received: from x%d by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % i for i in range(51))
    lines = smtp.send(MAIL + bdat(header[:1000]) + bdat(header[1000:] + b"\r\nbody\r\n", last=True))
    assert answered(lines[-1], replies.TOO_MANY_HOPS) and nothing_left(smtp)


def test_the_network_byte_budget_counts_chunked_messages(appliance: Callable[..., Appliance]) -> None:
    """[limits] mx_bytes_per_hour_per_network: BDAT messages are counted, so after the budget MAIL gets 452 4.7.1."""
    instance = appliance(start=False, extra={"limits": {"mx_bytes_per_hour_per_network": "20K"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with RawSMTP("127.0.0.1", instance.ports["mx"]) as smtp:
        smtp.ehlo()
        for _ in range(3):
            assert smtp.command("MAIL FROM:<s@remote.example>")[0] == 250
            assert smtp.command("RCPT TO:<alice@example.org>")[0] == 250
            assert smtp.bdat(b"Subject: filler\r\n\r\n" + b"x" * 78 + b"\r\n" * 100, last=False)[0] == 250
            assert smtp.bdat((b"y" * 78 + b"\r\n") * 100, last=True)[0] == 250
        code, lines = smtp.command("MAIL FROM:<s@remote.example>")
        assert (code, lines[-1][:5]) == (452, "4.7.1")


def test_a_chunked_message_over_the_mailbox_quota_gets_552_5_2_2(appliance: Callable[..., Appliance]) -> None:
    """The mailbox quota admits chunked messages at LAST like DATA messages: one that does not fit gets 552 5.2.2."""
    instance = appliance(start=False, extra={"storage": {"mailbox_quota": "100K"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with RawSMTP("127.0.0.1", instance.ports["mx"]) as smtp:
        smtp.ehlo()
        assert smtp.command("MAIL FROM:<s@remote.example>")[0] == 250
        assert smtp.command("RCPT TO:<alice@example.org>")[0] == 250
        body = (b"z" * 998 + b"\r\n") * 100
        assert smtp.bdat(b"Subject: big\r\n\r\n" + body)[0] == 250
        code, lines = smtp.bdat(body, last=True)
        assert (code, lines[-1][:5]) == (552, "5.2.2")
    assert not list(instance.maildir_root.glob("alice/new/*"))


def test_a_big_chunk_streams_to_disk_and_holds_no_input(tmp_path: Path) -> None:
    """A 3 MiB chunk arriving in 64 KiB pieces: each piece goes to the message at once (the session's
    input buffer stays empty), the message spills to disk past 1 MiB, and it is stored whole."""
    h = Harness(tmp_path, max_size=5 * 1024 * 1024)
    h.send(b"EHLO client.example.net\r\n" + MAIL)
    line = b"x" * 78 + b"\r\n"
    chunk = b"Subject: big\r\n\r\n" + line * (3 * 1024 * 1024 // len(line))
    h.send(b"BDAT %d LAST\r\n" % len(chunk))
    for start in range(0, len(chunk) - 65536, 65536):
        assert not h.send(chunk[start:start + 65536])
        assert not h.protocol.input
    assert h.protocol.delivery.spilled
    assert h.send(chunk[start + 65536:])[-1].startswith("250 2.0.0 Ok: queued as ")
    [stored] = h.messages("alice")
    assert stored.endswith(chunk)
