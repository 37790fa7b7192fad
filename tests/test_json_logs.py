"""JSON logs: one compact, documented object per event (issue 12, point 3)."""

from __future__ import annotations

import json
import smtplib
import subprocess
from pathlib import Path
from typing import Callable

from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from mailappliance.logs import event_line, event_record, is_twisted_noise
from tests.daemon import BIN, Appliance, toml_table


def captured(emit: Callable[[], None]) -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        emit()
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def test_a_session_event_is_the_documented_object() -> None:
    """time, level, event (without the session prefix), namespace, session, client, then the event's own fields."""
    [event] = captured(lambda: Logger(namespace="mailappliance.smtp").info(
        "session={session} client=[{client}] relay refused rcpt=<{rcpt}> reason={reason}",
        session="5e1a0c000012", client="192.0.2.7", rcpt="victim@elsewhere.example", reason="relay denied"))
    record = json.loads(event_line(event))
    assert list(record) == ["time", "level", "event", "namespace", "session", "client", "rcpt", "reason"]
    assert record["event"] == "relay refused rcpt=<victim@elsewhere.example> reason=relay denied"
    assert record["level"] == "info" and record["time"].endswith("Z")
    assert (record["session"], record["client"]) == ("5e1a0c000012", "192.0.2.7")
    assert not any(key.startswith("log_") for key in record)


def test_an_event_is_one_line_whatever_its_values() -> None:
    """Newlines in values and a traceback stay inside one JSON line; a failure adds error and traceback."""
    def fail() -> None:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            Logger(namespace="mailappliance").failure("commit failed for {who}", Failure(), who="a\nb")

    [event] = captured(fail)
    line = event_line(event)
    assert line.count("\n") == 1 and line.endswith("\n")
    record = json.loads(line)
    assert record["error"] == "ValueError: bad\nthing" and "Traceback" in record["traceback"]
    assert record["who"] == "a\nb" and record["level"] == "critical"


def test_objects_in_fields_are_not_dumped() -> None:
    """A field holding an object (a factory, a protocol) is left out; the message keeps its text."""
    class Thing:
        pass

    [event] = captured(lambda: Logger(namespace="twisted.internet").info("made {thing!r}", thing=Thing()))
    record = event_record(event)
    assert "thing" not in record and record["event"].startswith("made <")


def test_twisted_noise_is_recognised() -> None:
    """'Starting factory <...>' and the UDP port of every DNS query are noise; our own lines never are."""
    from twisted.internet import protocol

    events = captured(lambda: (protocol.Factory().doStart(), legacy_log.msg("DNSDatagramProtocol starting on 40001"),
                               legacy_log.msg("(UDP Port 40001 Closed)"),
                               Logger(namespace="mailappliance").info("Starting factory of nothing")))
    assert [is_twisted_noise(e) for e in events] == [True, True, True, False]
    errors = captured(lambda: Logger(namespace="x").error("Starting factory {factory!r}", factory=None))
    assert not is_twisted_noise(errors[0])  # never drop an error
    assert errors[0]["log_level"] == LogLevel.error


def test_the_json_file_has_the_schema_and_no_noise(appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """A delivery through the daemon: compact objects with the documented keys, no raw Twisted fields,
    no 'Starting factory' lines in either log."""
    events = tmp_path / "events.jsonl"
    instance = appliance(start=False, extra={"logging": {"json_file": str(events)}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("friend@example.net", ["alice@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
    instance.stop()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    for record in records:
        assert list(record)[:4] == ["time", "level", "event", "namespace"], record
        assert not any(key.startswith("log_") for key in record), record
        assert len(json.dumps(record)) < 1000, record
    accepted = [r for r in records if r["event"].startswith("accepted id=")]
    assert len(accepted) == 1 and accepted[0]["session"] and accepted[0]["client"] == "127.0.0.1"
    assert not any("Starting factory" in r["event"] for r in records)
    assert "Starting factory" not in instance.log()


def test_a_json_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    """json_file in a place that cannot hold it: exit 1 with one line naming logging.json_file and the file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = tmp_path / "m.toml"
    config.write_text(
        toml_table("[server]", {"local_domains": ["example.org"]})
        + toml_table("[storage]", {"maildir_root": str(tmp_path / "mail"), "spool_dir": str(tmp_path / "spool")})
        + toml_table("[tls]", {"certificate": str(tmp_path / "tls" / "s.pem"),
                               "private_key": str(tmp_path / "tls" / "s.key")})
        + toml_table("[logging]", {"json_file": str(blocker / "events.jsonl")})
        + toml_table("[directory]", {"ldif_file": str(tmp_path / "users.ldif")})
        + toml_table("[[listeners]]", {"role": "mx", "port": 2525})
    )
    (tmp_path / "users.ldif").write_text("")
    ran = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(tmp_path / "twistd.log"),
                          "mailappliance", "--config", str(config)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert ran.returncode == 1
    [line] = ran.stderr.strip().splitlines()
    assert line.startswith(f"mailappliance: cannot start: {config}: logging.json_file: cannot open "
                           f"{blocker / 'events.jsonl'}: "), line
