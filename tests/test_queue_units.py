"""Outbound queue pieces without sockets: wire format, schedule, state, reports, client."""

from __future__ import annotations

import email
import json
import os
import shutil
from email import policy
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailappliance.config import QueueSettings
from mailappliance.queue.client import OutboundJob, to_wire
from mailappliance.queue.dsn import build_dsn, recipient_status
from mailappliance.queue.routing import RoutingError
from mailappliance.queue.runner import Answer, QueueRunner, apply_answers
from mailappliance.queue.schedule import Outcome, next_attempt_at, outcome_of
from mailappliance.queue.spool import (
    ACTIVE,
    DEFERRED,
    DELIVERED,
    FAILED,
    INCOMING,
    PENDING,
    Envelope,
    OutboundSpool,
    QueueEntryCorrupt,
    bucket,
)
from mailappliance.settings import Relay
from tests.outbound_script import OutboundScript


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


def ScriptedServer(recipients: tuple[str, ...], data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> OutboundScript:  # noqa: N802
    """Our client sending ``data`` from alice to ``recipients``; the test plays the server."""
    return OutboundScript(OutboundJob(helo="mx.example.org", sender="alice@example.org", recipients=recipients,
                                      data=data))


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


# -- the spool's state directories and the runner's in-memory schedule

def spool_with(tmp_path: Path, queue_id: str = "1700000000.M1P2Q3.host", recipients: tuple[str, ...] = (
        "a@x.example",)) -> tuple[OutboundSpool, Envelope]:
    spool = OutboundSpool(tmp_path / "spool")
    received = tmp_path / "received.eml"
    received.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    envelope = Envelope.new(queue_id, "alice@example.org", list(recipients))
    spool.enqueue(received, envelope)
    return spool, envelope


def test_spool_moves_an_entry_through_its_states(tmp_path: Path) -> None:
    """enqueue writes incoming/, activate takes it to active/ (bytes to data/), a deferral lands in
    deferred/<hh>/ with the next attempt as mtime, and a finished round removes both files."""
    spool, envelope = spool_with(tmp_path)
    queue_id = envelope.queue_id
    assert spool.state_of(queue_id) == INCOMING and spool.incoming_ids() == [queue_id]
    assert spool.activate(queue_id) == envelope
    assert spool.state_of(queue_id) == ACTIVE and spool.incoming_ids() == []
    assert spool.message_path(queue_id) == spool.data_dir / bucket(queue_id) / f"{queue_id}.eml"
    assert spool.read_message(queue_id) == b"Subject: x\r\n\r\nbody\r\n"
    spool.store_round(queue_id, lambda e: setattr(e, "next_attempt", 4_000_000_000.0))
    path = spool.envelope_path(queue_id)
    assert path.parent == spool.deferred_dir / bucket(queue_id) and os.stat(path).st_mtime == 4_000_000_000.0
    spool.activate(queue_id)
    spool.store_round(queue_id, lambda e: setattr(e.recipients[0], "state", DELIVERED))
    assert spool.queued_ids() == [] and not list(spool.queue_dir.rglob("*.eml"))


def test_retry_puts_a_deferred_entry_back_into_incoming(tmp_path: Path) -> None:
    """An admin's retry makes the envelope due (next_attempt 0) and moves it to incoming/, which the daemon watches."""
    spool, envelope = spool_with(tmp_path)
    spool.activate(envelope.queue_id)
    spool.store_round(envelope.queue_id, lambda e: setattr(e, "next_attempt", 4_000_000_000.0))
    assert spool.retry(envelope.queue_id) == DEFERRED
    assert spool.incoming_ids() == [envelope.queue_id] and spool.envelope(envelope.queue_id).next_attempt == 0
    assert spool.read_message(envelope.queue_id).endswith(b"body\r\n")  # the bytes stay in data/


def test_recover_migrates_a_flat_spool_and_removes_orphans(tmp_path: Path) -> None:
    """A flat spool of the previous release moves into deferred/ and data/ (due by its next_attempt);
    a message file without an envelope anywhere (no 250 given) is removed."""
    queue = tmp_path / "spool" / "queue"
    queue.mkdir(parents=True)
    old = Envelope.new("1700000000.M1P1Q1.old", "alice@example.org", ["a@x.example"])
    old.next_attempt = 1234.0
    (queue / f"{old.queue_id}.json").write_text(json.dumps(old.to_json()))
    (queue / f"{old.queue_id}.eml").write_bytes(b"old message\r\n")
    (queue / "1700000000.M1P1Q2.orphan.eml").write_bytes(b"never committed\r\n")
    spool = OutboundSpool(tmp_path / "spool")
    found = spool.recover()
    assert (found.migrated, found.orphans, found.deferred, found.due_now) == (1, 1, [(1234.0, old.queue_id)], [])
    assert spool.state_of(old.queue_id) == DEFERRED and spool.read_message(old.queue_id) == b"old message\r\n"
    assert spool.envelope(old.queue_id) == old
    assert sorted(p.name for p in queue.iterdir() if p.is_file()) == [".lock"]


def test_recover_reads_no_envelope_of_the_deferred(tmp_path: Path) -> None:
    """The start-up scan takes the deferred schedule from names and mtimes: a deferred envelope that is
    not JSON at all is not read (it is set aside when it falls due)."""
    spool, envelope = spool_with(tmp_path)
    spool.activate(envelope.queue_id)
    spool.store_round(envelope.queue_id, lambda e: setattr(e, "next_attempt", 2_000_000_000.0))
    spool.envelope_path(envelope.queue_id).write_text("not json")
    os.utime(spool.envelope_path(envelope.queue_id), (0, 2_000_000_000.0))
    assert spool.recover().deferred == [(2_000_000_000.0, envelope.queue_id)]
    with pytest.raises(QueueEntryCorrupt):
        spool.activate(envelope.queue_id)
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == [f"{envelope.queue_id}.{x}" for x in ("eml", "json")]


class Recorder:
    """run_blocking that runs at once and counts the spool calls the runner makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(getattr(f, "__name__", repr(f)))
        return maybeDeferred(f, *args, **kwargs)


class DownRouter:
    """Every domain is unreachable for now (a 4xx before any connection)."""

    def uses_relay(self, domain: str) -> bool:
        return False

    async def next_hops(self, domain: str) -> list[Any]:
        raise RoutingError(451, "4.4.1 down for the test")


def runner_for(spool: OutboundSpool, clock: Clock, blocking: Recorder, retry: float = 60) -> QueueRunner:
    async def send_report(sender: str, report: bytes) -> None:
        raise AssertionError("no report expected")
    return QueueRunner(spool, DownRouter(), QueueSettings(retry_schedule=(retry,)), "mx.example.org",  # type: ignore[arg-type]
                       blocking, send_report, lambda hop: None, clock)  # type: ignore[arg-type, return-value]


def test_a_kick_reads_only_the_new_entry_not_the_backlog(tmp_path: Path) -> None:
    """With a deferred backlog, a new message costs one envelope read; the backlog is read when it falls due."""
    spool = OutboundSpool(tmp_path / "spool")
    received = tmp_path / "received.eml"
    received.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    for n in range(50):
        envelope = Envelope.new(f"1700000000.M{n}P1Q1.host", "alice@example.org", ["a@down.example"])
        spool.enqueue(received, envelope)
        spool.activate(envelope.queue_id)
        spool.store_round(envelope.queue_id, lambda e, n=n: setattr(e, "next_attempt", 1000.0 + n))
    clock, blocking = Clock(), Recorder()
    clock.advance(500)
    runner = runner_for(spool, clock, blocking, retry=10_000)
    runner.startService()
    assert runner.queued() == 50 and blocking.calls.count("activate") == 0
    fresh = Envelope.new("1700000001.M0P1Q1.host", "alice@example.org", ["b@down.example"])
    spool.enqueue(received, fresh)
    runner.kick()
    clock.advance(0)
    assert blocking.calls.count("activate") == 1  # the new one, tried at once, deferred to 10500
    assert spool.state_of(fresh.queue_id) == DEFERRED
    clock.advance(499)  # 999: nothing due, nothing read
    assert blocking.calls.count("activate") == 1
    clock.advance(1)  # 1000: the first of the backlog falls due
    assert blocking.calls.count("activate") == 2
    clock.advance(49)
    assert blocking.calls.count("activate") == 51 and runner.queued() == 51
    runner.stopService()


def test_a_vanished_or_corrupt_entry_does_not_stop_the_runner(tmp_path: Path) -> None:
    """An envelope deleted before it falls due is dropped; one whose message file vanished, and a
    foreign file in incoming/, are set aside or skipped; the next message is still tried."""
    spool = OutboundSpool(tmp_path / "spool")
    received = tmp_path / "received.eml"
    received.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    ids = [f"1700000000.M{n}P1Q1.host" for n in range(3)]
    for queue_id in ids:
        spool.enqueue(received, Envelope.new(queue_id, "alice@example.org", ["a@down.example"]))
    clock, blocking = Clock(), Recorder()
    runner = runner_for(spool, clock, blocking)
    runner.startService()
    clock.advance(0)
    assert runner.queued() == 3
    spool.remove(ids[0])  # an admin's delete
    os.unlink(spool.message_path(ids[1]))  # the bytes vanish
    (spool.incoming_dir / "garbage.json").write_text("{")
    (spool.incoming_dir / "README").write_text("not ours")
    clock.advance(61)
    assert spool.state_of(ids[2]) == DEFERRED and runner.queued() == 1
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == sorted([f"{ids[1]}.json", "garbage.json"])
    assert (spool.incoming_dir / "README").exists()  # not a name of ours: left alone
    runner.stopService()


def test_a_retry_of_the_whole_queue_is_listed_once_not_once_per_round(tmp_path: Path) -> None:
    """More entries in incoming/ than the fresh lane holds wait in memory: incoming/ is not listed
    again for each round that finishes, and every entry is tried."""
    spool = OutboundSpool(tmp_path / "spool")
    received = tmp_path / "received.eml"
    received.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
    for n in range(30):
        spool.enqueue(received, Envelope.new(f"1700000000.M{n}P1Q1.host", "alice@example.org", ["a@down.example"]))
    clock, blocking = Clock(), Recorder()
    runner = runner_for(spool, clock, blocking, retry=10_000)
    runner.lane_limits["fresh"] = 4
    runner.startService()
    clock.advance(0)
    assert blocking.calls.count("activate") == 30 and blocking.calls.count("incoming_ids") <= 2
    assert runner.queued() == 30 and runner.oldest_age(1700000100.0) == 100.0
    runner.stopService()


class Crash(Exception):
    """Injected: the process dies here."""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[str]:
    """Make the ``step``-th file system call (link, rename, unlink, fsync, utime) fail, as a crash there."""
    calls: list[str] = []
    for name in ("link", "rename", "unlink", "fsync", "utime"):
        real = getattr(os, name)

        def wrapper(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            if len(calls) == step:
                raise Crash(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(os, name, wrapper)
    return calls


def whole(spool: OutboundSpool) -> dict[str, str]:
    """After a restart's recover: each queued id's state; each has one envelope and its bytes, no debris."""
    spool.recover()
    states = {}
    for queue_id in spool.queued_ids():
        assert len(list(spool.queue_dir.rglob(f"{queue_id}.json"))) == 1
        assert spool.envelope(queue_id).queue_id == queue_id
        assert spool.read_message(queue_id) == b"Subject: x\r\n\r\nbody\r\n"
        states[queue_id] = spool.state_of(queue_id)
    assert not list(spool.queue_dir.rglob("*.tmp")) and not list(spool.corrupt_dir.iterdir())
    assert len(list(spool.queue_dir.rglob("*.eml"))) == len(states)  # no orphans
    return states


OPERATIONS: dict[str, Any] = {
    "activate": lambda s, q: s.activate(q),
    "defer": lambda s, q: (s.activate(q), s.store_round(q, lambda e: setattr(e, "next_attempt", 9e9))),
    "finish": lambda s, q: (s.activate(q), s.store_round(q, lambda e: setattr(e.recipients[0], "state", DELIVERED))),
    "retry": lambda s, q: s.retry(q),
    "delete": lambda s, q: s.remove(q),
}


@pytest.mark.parametrize("operation", ["enqueue", "migrate", *OPERATIONS])
def test_a_crash_at_every_step_leaves_a_whole_entry_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            operation: str) -> None:
    """A crash after any link, rename, unlink, fsync or utime of an operation leaves, after the next
    start's scan, either the whole entry (envelope in one place, its bytes found) or none (enqueue
    before its commit, a finished or deleted one), never debris."""
    step = 1
    while True:
        root = tmp_path / f"{operation}-{step}"
        root.mkdir()
        received = root / "received.eml"
        received.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        spool = OutboundSpool(root / "spool")
        envelope = Envelope.new("1700000000.M1P1Q1.host", "alice@example.org", ["a@x.example"])
        if operation == "migrate":  # a flat spool of the previous release
            (root / "spool" / "queue").mkdir(parents=True)
            (root / "spool" / "queue" / f"{envelope.queue_id}.json").write_text(json.dumps(envelope.to_json()))
            shutil.copyfile(received, root / "spool" / "queue" / f"{envelope.queue_id}.eml")
        elif operation != "enqueue":
            spool.enqueue(received, envelope)
            if operation in ("retry", "delete"):
                OPERATIONS["defer"](spool, envelope.queue_id)
        with monkeypatch.context() as patch:
            calls = crash_at(patch, step)
            try:
                if operation == "enqueue":
                    spool.enqueue(received, envelope)
                elif operation == "migrate":
                    spool.recover()
                else:
                    OPERATIONS[operation](spool, envelope.queue_id)
                finished = True
            except Crash:
                finished = False
        states = whole(OutboundSpool(root / "spool"))
        assert len(states) <= 1
        if operation in ("activate", "defer", "retry", "migrate"):
            assert states, f"lost at step {step} ({calls[-1]})"
        if finished:
            break
        step += 1
    assert step > 2
