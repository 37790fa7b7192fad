"""Outbound queue pieces without sockets: wire format, schedule, state, reports, client."""

from __future__ import annotations

import email
from email import policy

import pytest
from twisted.internet.testing import StringTransport

from mailappliance.queue.client import OutboundFactory, OutboundJob, to_wire
from mailappliance.queue.dsn import build_dsn, recipient_status
from mailappliance.settings import Relay
from mailappliance.config import QueueSettings
from mailappliance.queue.runner import Answer, apply_answers
from mailappliance.queue.schedule import Outcome, next_attempt_at, outcome_of
from mailappliance.queue.spool import DELIVERED, FAILED, PENDING, Envelope


@pytest.mark.parametrize("stored, wire", [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
    (b"a\rb", b"a\r\nb\r\n.\r\n"),
    (b".start\r\n..two\r\nx\r\n.\r\n", b"..start\r\n...two\r\nx\r\n..\r\n.\r\n"),
    (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"", b".\r\n"),
])
def test_to_wire_is_canonical_crlf_and_dot_stuffed(stored: bytes, wire: bytes) -> None:
    """Stored text goes out with CRLF line ends, dot-stuffed, a final CRLF added and the terminator after."""
    assert to_wire(stored) == wire


def test_outcomes() -> None:
    """2xx is delivered, 4xx and no answer (0) retry, 5xx is a permanent failure."""
    assert [outcome_of(c) for c in (250, 251, 451, 421, 0, 550, 554)] == [
        Outcome.DELIVERED, Outcome.DELIVERED, Outcome.RETRY, Outcome.RETRY, Outcome.RETRY,
        Outcome.FAILED, Outcome.FAILED]


def test_schedule_repeats_last_step_and_stops_at_max_age() -> None:
    """Retries follow the schedule, repeat its last step, get one last try at max_age, then stop."""
    schedule = (60.0, 300.0)
    assert next_attempt_at(1, 0, 10, schedule, 1000) == 70
    assert next_attempt_at(2, 0, 10, schedule, 1000) == 310
    assert next_attempt_at(9, 0, 10, schedule, 1000) == 310
    assert next_attempt_at(9, 0, 900, schedule, 1000) == 1000  # one last try at the deadline
    assert next_attempt_at(9, 0, 1000, schedule, 1000) is None


def test_apply_answers() -> None:
    """Answers update each recipient's state and the next attempt; past max_age the pending ones fail."""
    envelope = Envelope.new("q1", "alice@example.org", ["a@x.example", "b@x.example", "c@y.example"],
                            received_at=0)
    settings = QueueSettings(retry_schedule=(60,), max_age=600)
    failed = apply_answers(envelope, {"a@x.example": Answer(250, "ok"), "b@x.example": Answer(550, "5.1.1 no"),
                                      "c@y.example": Answer(451, "4.3.0 later")}, now=100, settings=settings)
    assert [r.address for r in failed] == ["b@x.example"]
    assert [r.state for r in envelope.recipients] == [DELIVERED, FAILED, PENDING]
    assert envelope.next_attempt == 160
    failed = apply_answers(envelope, {"c@y.example": Answer(451, "4.3.0 later")}, now=600, settings=settings)
    assert [r.address for r in failed] == ["c@y.example"] and envelope.finished
    assert "gave up after 2 attempts" in envelope.recipients[2].last_text


def test_envelope_json_round_trip() -> None:
    """An envelope survives its JSON form unchanged."""
    envelope = Envelope.new("q1", "", ["a@x.example"], authenticated_as="alice")
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_dsn_is_a_valid_multipart_report() -> None:
    """A DSN is an RFC 3464 multipart/report with the failed recipient's status and only the original headers."""
    original = b"From: alice@example.org\r\nSubject: hello\r\n\r\nsecret body\r\n"
    report = build_dsn(reporting_host="mx.example.org", original_sender="alice@example.org", queue_id="q1",
                       arrival_date=0, original_message=original,
                       statuses=[recipient_status("b@x.example", "failed", 550, "5.1.1 no such user",
                                                  "mx.x.example")])
    assert b"\n" not in report.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(report, policy=policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; b@x.example" in status and "Status: 5.1.1" in status
    assert "Action: failed" in status and "Diagnostic-Code: smtp; 550 5.1.1 no such user" in status
    assert b"Subject: hello" in report and b"secret body" not in report
    assert parsed["To"] == "alice@example.org" and parsed["Auto-Submitted"] == "auto-replied"


@pytest.mark.parametrize("text, relay", [
    ("smtp.example.net", Relay("smtp.example.net", 25, True)),
    ("[smtp.example.net]:587", Relay("smtp.example.net", 587, False)),
    ("smtp.example.net:2525", Relay("smtp.example.net", 2525, True)),
    ("[127.0.0.1]", Relay("127.0.0.1", 25, False)),
])
def test_relay_syntax(text: str, relay: Relay) -> None:
    """Smarthost syntax: brackets turn off MX lookup, a port may follow, the default port is 25."""
    assert Relay.parse(text) == relay


@pytest.mark.parametrize("text", ["[host", "host:0", "host:x", ":25", "[]"])
def test_relay_syntax_errors(text: str) -> None:
    """Malformed smarthost values (open bracket, port 0 or not a number, no host) are refused."""
    with pytest.raises(ValueError):
        Relay.parse(text)


class ScriptedServer:
    """Feeds server replies to an OutboundSession and records what the client sent."""

    def __init__(self, recipients: tuple[str, ...], data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> None:
        self.factory = OutboundFactory(OutboundJob(helo="mx.example.org", sender="alice@example.org",
                                                   recipients=recipients, data=data))
        self.results: list = []
        self.factory.finished.addCallback(self.results.append)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def say(self, line: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(line)
        return self.transport.value()


def test_client_transaction_with_one_refused_recipient() -> None:
    """The client sends one transaction; a refused recipient keeps its 550, the others get DATA's 250."""
    s = ScriptedServer(("a@x.example", "b@x.example"))
    assert s.say(b"220 hi\r\n") == b"EHLO mx.example.org\r\n"
    assert s.say(b"250-x.example\r\n250-SIZE 1000\r\n250 PIPELINING\r\n").startswith(
        b"MAIL FROM:<alice@example.org> SIZE=")
    assert s.say(b"250 ok\r\n") == b"RCPT TO:<a@x.example>\r\n"
    assert s.say(b"250 ok\r\n") == b"RCPT TO:<b@x.example>\r\n"
    assert s.say(b"550 5.1.1 no such user\r\n") == b"DATA\r\n"
    assert s.say(b"354 go\r\n") == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    assert s.say(b"250 2.0.0 queued\r\n") == b"QUIT\r\n"
    [result] = s.results
    assert result.replies == {"a@x.example": (250, "2.0.0 queued"), "b@x.example": (550, "5.1.1 no such user")}


def test_client_greeting_refusal_applies_to_everyone() -> None:
    """A 554 greeting is every recipient's answer."""
    s = ScriptedServer(("a@x.example",))
    s.say(b"554 go away\r\n")
    assert s.results[0].replies == {"a@x.example": (554, "go away")}


def test_client_connection_lost_is_temporary() -> None:
    """A connection lost mid-session is a 451 for every recipient (retry)."""
    s = ScriptedServer(("a@x.example",))
    s.say(b"220 hi\r\n")
    s.protocol.connectionLost()
    [result] = s.results
    code, text = result.replies["a@x.example"]
    assert code == 451 and "connection lost" in text


def test_client_uses_helo_when_ehlo_is_refused() -> None:
    """When EHLO is refused the client falls back to HELO and sends no ESMTP parameters."""
    s = ScriptedServer(("a@x.example",))
    s.say(b"220 hi\r\n")
    assert s.say(b"502 no ehlo\r\n") == b"HELO mx.example.org\r\n"
    assert s.say(b"250 hello\r\n") == b"MAIL FROM:<alice@example.org>\r\n"
