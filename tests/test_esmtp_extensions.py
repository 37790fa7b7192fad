"""DSN, SMTPUTF8 and CHUNKING without sockets: parameter parsing (pure), UTF-8 paths,
the session's answers, the outbound client's words to the next hop, and reports."""

from __future__ import annotations

import email
from email import policy
from pathlib import Path

import attrs
import pytest

from mailappliance.directory import Subscriber
from mailappliance.queue.client import OutboundJob, smtputf8_need, tls_failure_type
from mailappliance.queue.dsn import build_dsn, recipient_status
from mailappliance.queue.notices import read_original
from mailappliance.queue.spool import Envelope
from mailappliance.smtp import replies
from mailappliance.dsn_params import (
    Orcpt,
    ParameterError,
    notify_wants,
    parse_mail_parameters,
    parse_notify,
    parse_orcpt,
    parse_rcpt_parameters,
    xtext_decode,
    xtext_encode,
)
from mailappliance.mailpath import NonAsciiAddress, PathSyntaxError, parse_path
from tests.outbound_script import OutboundScript
from tests.replies import answered
from tests.test_smtp_protocol import Harness

JOERG = Subscriber(dn="uid=joerg,ou=people,dc=example,dc=org", uid="joerg", mail="jörg@example.org")


# -- parameters (pure) ----------------------------------------------------------------



def answer_to(error: ParameterError) -> tuple[int, str]:
    """The SMTP code and enhanced status the session answers a parameter error with."""
    reply = replies.for_parameter_error(error)
    return reply.code, reply.status

def test_xtext_round_trip() -> None:
    """xtext (RFC 3461 4): '+' and '=' and controls are +HH; decoding gives the text back."""
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    for bad in ("a+2b", "a+", "a=b", "+0A"):  # lower-case hex, cut short, '=', a control character
        with pytest.raises(ParameterError):
            xtext_decode(bad)


@pytest.mark.parametrize("value, parsed", [
    ("NEVER", ("NEVER",)), ("success", ("SUCCESS",)), ("DELAY,FAILURE,SUCCESS", ("SUCCESS", "FAILURE", "DELAY")),
])
def test_notify_values(value: str, parsed: tuple[str, ...]) -> None:
    """NOTIFY is NEVER alone or a set of SUCCESS, FAILURE, DELAY (any case, any order)."""
    assert parse_notify(value) == parsed


@pytest.mark.parametrize("value", ["NEVER,SUCCESS", "SUCCESS,SUCCESS", "", "ALWAYS", "SUCCESS,"])
def test_bad_notify_values_are_501(value: str) -> None:
    """NEVER with others, repeats, empty and unknown words are syntax errors (501 5.5.4)."""
    with pytest.raises(ParameterError) as e:
        parse_notify(value)
    assert answer_to(e.value) == (501, "5.5.4")


def test_orcpt_forms() -> None:
    """ORCPT: rfc822 with xtext, utf-8 with \\x{HEX} (RFC 6533); both go out again in an ASCII form."""
    assert parse_orcpt("rfc822;a+2Bb@example.org") == Orcpt("rfc822", "a+b@example.org")
    utf8 = parse_orcpt("utf-8;j\\x{F6}rg@example.org")
    assert utf8 == Orcpt("utf-8", "jörg@example.org")
    assert utf8.parameter() == "utf-8;j\\x{F6}rg@example.org"
    assert Orcpt("rfc822", "a+b@example.org").parameter() == "rfc822;a+2Bb@example.org"
    assert Orcpt.from_stored(utf8.stored()) == utf8
    for bad in ("x400;abc", "rfc822", "rfc822;", "utf-8;a\\x{0}b", "rfc822;" + "a" * 500):
        with pytest.raises(ParameterError):
            parse_orcpt(bad)


def test_mail_parameters() -> None:
    """MAIL: SIZE, BODY, SMTPUTF8, RET, ENVID; a repeated or unknown parameter is refused."""
    parsed = parse_mail_parameters(["SIZE=100", "BODY=8BITMIME", "SMTPUTF8", "RET=hdrs", "ENVID=QQ+2B1"], 1000)
    assert (parsed.size, parsed.body, parsed.smtputf8, parsed.ret, parsed.envid) == \
        (100, "8BITMIME", True, "HDRS", "QQ+1")
    cases = {("SIZE=1", "SIZE=1"): 501, ("RET=ALL",): 501, ("SMTPUTF8=yes",): 501, ("ENVID=" + "x" * 101,): 501,
             ("BODY=BINARYMIME",): 501, ("SIZE=2000",): 552, ("MT-PRIORITY=1",): 555}
    for words, code in cases.items():
        with pytest.raises(ParameterError) as e:
            parse_mail_parameters(list(words), 1000)
        assert answer_to(e.value)[0] == code, words


def test_rcpt_parameters_and_what_they_ask_for() -> None:
    """No NOTIFY means failures and delays are reported, successes not; NEVER means nothing."""
    default = parse_rcpt_parameters([])
    assert default.wants("FAILURE") and default.wants("DELAY") and not default.wants("SUCCESS")
    never = parse_rcpt_parameters(["NOTIFY=NEVER"])
    assert not any(never.wants(e) for e in ("SUCCESS", "FAILURE", "DELAY"))
    assert notify_wants("SUCCESS", "SUCCESS") and not notify_wants("SUCCESS", "FAILURE")
    with pytest.raises(ParameterError) as e:
        parse_rcpt_parameters(["FOO=1"])
    assert answer_to(e.value)[0] == 555


# -- UTF-8 paths ------------------------------------------------------------------------


def test_utf8_paths_are_nfc_with_a_label_domains() -> None:
    """A decomposed 'ö' becomes NFC; a U-label domain becomes its A-label; an A-label is accepted as it is."""
    path = parse_path("<Jo\u0308rg@Bücher.example>", allow_null=False, utf8=True)
    assert (path.local_part, path.domain) == ("Jörg", "xn--bcher-kva.example")
    assert parse_path("<a@xn--bcher-kva.example>", allow_null=False).domain == "xn--bcher-kva.example"


def test_utf8_paths_need_smtputf8_and_refuse_tricks() -> None:
    """Without SMTPUTF8 a UTF-8 address is NonAsciiAddress (553 5.6.7); bidi overrides, spaces,
    undecodable bytes and invalid U-labels are refused with it; the length counts octets."""
    with pytest.raises(NonAsciiAddress):
        parse_path("<jörg@example.org>", allow_null=False)
    for bad in ("<j\u202eörg@example.org>", "<jö rg@example.org>", "<j\ufffdrg@example.org>",
                "<jörg@exa\u00a0mple.org>", "<jörg@-bücher.example>", "<" + "ö" * 33 + "@example.org>"):
        with pytest.raises(PathSyntaxError):
            parse_path(bad, allow_null=False, utf8=True)


# -- the session ---------------------------------------------------------------------------


@pytest.fixture
def smtp(tmp_path: Path) -> Harness:
    h = Harness(tmp_path)
    h.directory.subscribers = (*h.directory.subscribers, JOERG)
    h.send(b"EHLO client.example.net\r\n")
    return h


def test_ehlo_offers_dsn_smtputf8_and_chunking(smtp: Harness) -> None:
    """EHLO lists DSN, SMTPUTF8 and CHUNKING (not BINARYMIME), ENHANCEDSTATUSCODES still last."""
    lines = smtp.send(b"EHLO client.example.net\r\n")
    assert {"250-DSN", "250-SMTPUTF8", "250-CHUNKING"} <= set(lines) and lines[-1] == "250 ENHANCEDSTATUSCODES"


def test_utf8_address_without_smtputf8_is_553_5_6_7(smtp: Harness) -> None:
    """RFC 6531 3.5: a UTF-8 sender or recipient in a transaction without SMTPUTF8 gets 553 5.6.7."""
    assert answered(smtp.send("MAIL FROM:<jörg@example.net>\r\n".encode())[0], replies.NON_ASCII_ADDRESS)
    smtp.send(b"MAIL FROM:<s@example.net>\r\n")
    assert answered(smtp.send("RCPT TO:<jörg@example.org>\r\n".encode())[0], replies.NON_ASCII_ADDRESS)


def test_smtputf8_delivers_to_a_utf8_mailbox(smtp: Harness) -> None:
    """With SMTPUTF8 a decomposed UTF-8 recipient finds the NFC one in the directory; Received says UTF8SMTP."""
    codes = smtp.codes("MAIL FROM:<pelé@exämple.net> SMTPUTF8\r\nRCPT TO:<Jo\u0308rg@example.org>\r\nDATA\r\n"
                       .encode() + "Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode())
    assert codes == [250, 250, 354, 250]
    [stored] = smtp.messages("joerg")
    assert "Return-Path: <pelé@xn--exmple-cua.net>".encode() in stored
    assert b" with UTF8SMTP id " in stored and "Subject: grüße".encode() in stored


def test_dsn_parameters_are_accepted_or_refused_exactly(smtp: Harness) -> None:
    """RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT are accepted; bad values get 501, HELO sessions 555."""
    assert smtp.codes(b"MAIL FROM:<s@example.net> RET=FULL ENVID=abc+2B1\r\n"
                      b"RCPT TO:<alice@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@example.org\r\n"
                      b"RCPT TO:<bob@example.org> NOTIFY=NEVER,DELAY\r\n") == [250, 250, 501]
    transaction = smtp.protocol.transaction
    assert transaction.mail_parameters.envid == "abc+1"
    assert transaction.recipient_parameters["alice@example.org"].notify == ("SUCCESS", "FAILURE")


def test_bdat_message_is_stored_like_data(smtp: Harness) -> None:
    """Chunks without dot-stuffing: a leading dot stays, the trace fields are ours, the message is whole."""
    chunks = [b"Subject: chunks\r\n\r\n", b".leading dot\r\n", b"\r\n.\r\nend\r\n"]
    smtp.send(b"MAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n")
    answers = [smtp.send(b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == 2 else b"") + c)[-1]
               for i, c in enumerate(chunks)]
    assert answers[:2] == ["250 2.0.0 Ok: 19 octets received", "250 2.0.0 Ok: 14 octets received"]
    assert answers[2].startswith("250 2.0.0 Ok: queued as ")
    [stored] = smtp.messages("bob")
    assert stored.startswith(b"Return-Path: <s@example.net>\r\nDelivered-To: bob@example.org\r\nReceived: ")
    assert stored.endswith(b"".join(chunks))


# -- the outbound client ---------------------------------------------------------------------


JOB = OutboundJob(helo="mx.example.org", sender="alice@example.org", recipients=("a@x.example",),
                  data=b"Subject: x\r\n\r\nbody\r\n", ret="HDRS", envid="id 1",
                  dsn={"a@x.example": ("SUCCESS,FAILURE", "rfc822;a+b@x.example")})


def test_client_carries_dsn_to_a_hop_that_offers_it() -> None:
    """The next hop offers DSN: MAIL gets RET and ENVID, RCPT NOTIFY and ORCPT, in xtext."""
    s = OutboundScript(JOB)
    s.say(b"220 hi\r\n")
    assert s.say(b"250-x.example\r\n250 DSN\r\n") == b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=id+201\r\n"
    assert s.say(b"250 ok\r\n") == b"RCPT TO:<a@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@x.example\r\n"
    s.say(b"250 ok\r\n")
    s.say(b"354 go\r\n")
    s.say(b"250 queued\r\n")
    assert s.results[0].dsn


def test_client_leaves_dsn_out_for_a_hop_without_it() -> None:
    """Without DSN at the next hop no DSN parameter is sent (we report "relayed" ourselves)."""
    s = OutboundScript(JOB)
    s.say(b"220 hi\r\n")
    assert s.say(b"250 x.example\r\n") == b"MAIL FROM:<alice@example.org>\r\n"
    assert s.say(b"250 ok\r\n") == b"RCPT TO:<a@x.example>\r\n"


def test_client_refuses_utf8_for_a_hop_without_smtputf8() -> None:
    """UTF-8 addresses and no SMTPUTF8 at the next hop: 553 5.6.7 for everyone, nothing sent; a UTF-8
    header of an SMTPUTF8 message: 550 5.6.9; with SMTPUTF8 offered, MAIL carries it."""
    job = attrs.evolve(JOB, recipients=("jörg@x.example",), dsn={}, smtputf8=True)
    s = OutboundScript(job)
    s.say(b"220 hi\r\n")
    assert b"MAIL" not in s.say(b"250 x.example\r\n")
    assert s.results[0].replies["jörg@x.example"][0] == 553
    assert s.results[0].replies["jörg@x.example"][1].startswith("5.6.7 ")
    s = OutboundScript(attrs.evolve(job, recipients=("a@x.example",), data="Subject: ü\r\n\r\n".encode()))
    s.say(b"220 hi\r\n")
    s.say(b"250 x.example\r\n")
    assert s.results[0].replies["a@x.example"][1].startswith("5.6.9 ")
    s = OutboundScript(job)
    s.say(b"220 hi\r\n")
    assert s.say(b"250-x.example\r\n250 SMTPUTF8\r\n") == b"MAIL FROM:<alice@example.org> SMTPUTF8\r\n"


def test_smtputf8_need() -> None:
    """An ASCII message sent with SMTPUTF8 needs nothing; a UTF-8 address always; a UTF-8 header only
    if the client said SMTPUTF8 (legacy 8-bit headers go on as before)."""
    assert smtputf8_need(True, "a@x", ["b@y"], b"Subject: x\r\n\r\n\xc3\xbc") == ""
    assert smtputf8_need(False, "a@x", ["bö@y"], b"") == "address"
    assert smtputf8_need(True, "a@x", ["b@y"], "Subject: ü\r\n\r\n".encode()) == "header"
    assert smtputf8_need(False, "a@x", ["b@y"], "Subject: ü\r\n\r\n".encode()) == ""


def test_tls_failure_names() -> None:
    """Handshake errors are named with TLS-RPT's result types."""
    assert tls_failure_type("VerificationError(errors=[DNSMismatch(...)])") == "certificate-host-mismatch"
    assert tls_failure_type("[('SSL routines', '', 'certificate verify failed')]") == "certificate-not-trusted"
    assert tls_failure_type("connection lost") == "validation-failure"


# -- reports ----------------------------------------------------------------------------------


def test_success_report_with_envid_orcpt_and_the_full_message() -> None:
    """A success notice names ENVID and ORCPT; RET=FULL returns the whole message as message/rfc822."""
    original = b"From: a@example.org\r\nSubject: hello\r\n\r\nthe body\r\n"
    report = build_dsn(reporting_host="mx.example.org", original_sender="a@example.org", queue_id="q1",
                       arrival_date=0, original_message=original, envid="abc+1", return_full=True,
                       statuses=[recipient_status("b@example.org", "delivered", 250, "2.0.0 delivered", "",
                                                  "rfc822; B@example.org")])
    parsed = email.message_from_bytes(report, policy=policy.default)
    assert parsed["Subject"] == "Successful Mail Delivery Report"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "message/rfc822"]
    status = parts[1].as_string()
    assert "Original-Envelope-Id: abc+1" in status and "Original-Recipient: rfc822; B@example.org" in status
    assert "Action: delivered" in status and "Status: 2.0.0" in status
    assert b"the body" in report


def test_report_about_a_utf8_address_is_global_delivery_status() -> None:
    """RFC 6533: a report naming a UTF-8 address is message/global-delivery-status in UTF-8."""
    report = build_dsn(reporting_host="mx.example.org", original_sender="a@example.org", queue_id="q1",
                       arrival_date=0, original_message=b"Subject: x\r\n\r\n",
                       statuses=[recipient_status("jörg@x.example", "failed", 553, "5.6.7 no SMTPUTF8")])
    assert "Final-Recipient: utf-8; jörg@x.example".encode() in report
    assert b"Content-Type: message/global-delivery-status" in report
    assert b"Content-Type: message/global-headers" in report


def test_envelope_keeps_dsn_fields_and_reads_old_ones() -> None:
    """NOTIFY, ORCPT, RET, ENVID and SMTPUTF8 survive the envelope's JSON; an envelope written before
    they existed still loads."""
    envelope = Envelope.new("q1", "a@example.org", ["b@x.example", "c@x.example"], notify={"b@x.example": "NEVER"},
                            orcpt={"b@x.example": "rfc822;B@x.example"}, ret="FULL", envid="e", smtputf8=True)
    assert Envelope.from_json(envelope.to_json()) == envelope
    assert envelope.recipients[1].notify == ""
    old = envelope.to_json()
    for field in ("ret", "envid", "smtputf8"):
        del old[field]
    for recipient in old["recipients"]:
        del recipient["notify"], recipient["orcpt"]
    assert Envelope.from_json(old).ret == ""


def test_original_read_back_without_our_trace_fields(tmp_path: Path) -> None:
    """A success notice returns the message without our Return-Path and Delivered-To."""
    path = tmp_path / "m"
    path.write_bytes(b"Return-Path: <a@b>\r\nDelivered-To: c@d\r\nReceived: x\r\nSubject: s\r\n\r\nbody\r\n")
    assert read_original(path, full=True) == b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"
