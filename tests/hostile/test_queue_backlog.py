"""The outbound queue under a backlog and with files it did not write: a flood of
deferred mail must not delay fresh mail, and nothing in the queue directories
that is not a committed entry of ours may stop the runner."""

from __future__ import annotations

import json
import os
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailappliance.queue.spool import Envelope, OutboundSpool, bucket
from tests.conditions import silent_server, wait_until
from tests.daemon import Appliance, free_port

pytest_plugins = ["tests.remote"]

MESSAGE = b"From: alice@example.org\r\nTo: friend@remote.example\r\nSubject: fresh\r\n\r\nfresh mail\r\n"


@pytest.fixture
def hung_port() -> Iterator[int]:
    with silent_server() as port:
        yield port


@pytest.fixture
def world(dns_server: Any, smtp_receiver: Any, pki: Any) -> dict[str, Any]:
    port = free_port()
    dns_server.serve({"remote.example": ["MX('remote.example', 10, 'mx1.remote.example')",
                                         "A('mx1.remote.example', '127.0.0.2')"]})
    return {"port": port, "dns": dns_server,
            "remote": smtp_receiver(host="127.0.0.2", port=port, tls=(pki.server_cert, pki.server_key))}


def make_appliance(appliance: Callable[..., Appliance], world: dict[str, Any], pki: Any, hung: int) -> Appliance:
    instance = appliance(pki=pki, start=False, extra={
        "queue": {"resolver": world["dns"].address, "smtp_port": world["port"], "retry_schedule": [3600],
                  "connect_timeout": 2, "command_timeout": 20, "scan_interval": 30},
        "queue.transports": {'"hung.example"': f"[127.0.0.1]:{hung}"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    return instance


def write_deferred(spool: OutboundSpool, count: int, due: float = 0.0) -> list[str]:
    """``count`` committed entries for the hung host, written straight into deferred/ and data/
    (no fsync: a fixture, not a transaction), each due at ``due``."""
    spool.prepare()
    ids = []
    for n in range(count):
        queue_id = f"1700000000.M{n}P1Q1.flood"
        envelope = Envelope.new(queue_id, "alice@example.org", [f"victim{n}@hung.example"])
        for kind, directory, body in (("eml", spool.data_dir, b"Subject: old\r\n\r\nold\r\n"),
                                      ("json", spool.deferred_dir, json.dumps(envelope.to_json()).encode())):
            path = directory / bucket(queue_id) / f"{queue_id}.{kind}"
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_bytes(body)
            os.utime(path, (due, due))
        ids.append(queue_id)
    return ids


def submit(instance: Appliance) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("alice", "alice-password")
        assert smtp.sendmail("alice@example.org", ["friend@remote.example"], MESSAGE) == {}


def test_a_due_flood_for_a_hung_host_does_not_delay_fresh_mail(appliance: Callable[..., Appliance],
                                                               world: dict[str, Any], pki: Any,
                                                               hung_port: int) -> None:
    """2,000 deferred messages, all due, for a host that accepts and never answers: fresh mail to a
    reachable host leaves while nearly all of the flood is still waiting for its turn."""
    instance = make_appliance(appliance, world, pki, hung_port)
    write_deferred(OutboundSpool(instance.root / "spool"), 2000)
    instance.start()
    wait_until(lambda: "2000 deferred" in instance.log(), what="the schedule rebuilt from the flood")
    submit(instance)
    [received] = world["remote"].wait_for(1)
    assert received.data.endswith(MESSAGE)
    assert instance.log().count("@hung.example>") < 100  # the flood had barely started


def test_foreign_corrupt_and_vanished_entries_are_skipped_and_logged(appliance: Callable[..., Appliance],
                                                                      world: dict[str, Any], pki: Any,
                                                                      hung_port: int) -> None:
    """Foreign names, unparsable or hostile envelopes (a symbolic link, a directory, JSON of the wrong
    shape) and an envelope whose message file vanished are set aside or skipped with a log line, in
    every queue directory, at start and while running; the runner goes on delivering."""
    instance = make_appliance(appliance, world, pki, hung_port)
    spool = OutboundSpool(instance.root / "spool")
    [vanished] = write_deferred(spool, 1)
    os.unlink(spool.data_dir / bucket(vanished) / f"{vanished}.eml")
    (spool.queue_dir / "README").write_text("notes of another tool")
    (spool.incoming_dir / "truncated.json").write_text('{"queue_id": "trunc')
    (spool.incoming_dir / "somedir").mkdir()
    (spool.incoming_dir / "dir.json").mkdir()
    (spool.incoming_dir / "passwd.json").symlink_to("/etc/passwd")
    (spool.active_dir / "list.json").write_text("[]")
    (spool.deferred_dir / "zz").mkdir()
    (spool.deferred_dir / "zz" / "misplaced.json").write_text("{}")
    (spool.deferred_dir / "stray").write_text("x")
    (spool.data_dir / "junk").write_text("x")
    instance.start()
    submit(instance)
    world["remote"].wait_for(1)
    (spool.incoming_dir / "late.json").write_text("\x00" * 100)  # while running: the watch finds it
    wait_until(lambda: (spool.corrupt_dir / "late.json").exists()
               and "queue: late set aside in queue/corrupt/" in instance.log(),
               what="the late garbage set aside and logged (the move comes before the log line)")
    log = instance.log()
    for name in ("queue/README", "queue/incoming/somedir", "queue/deferred/zz/misplaced.json",
                 "queue/deferred/stray", "queue/data/junk"):
        assert f"queue: {name} is not a queue entry of ours: skipped" in log, name
    for name in (vanished, "truncated", "dir", "passwd", "list", "late"):
        assert f"queue: {name} set aside in queue/corrupt/" in log, name
    assert (spool.corrupt_dir / "passwd.json").is_symlink() and Path("/etc/passwd").exists()
    assert spool.queued_ids() == []  # the fresh message left; nothing of the rest is queued
    assert instance.admin("queue", "list").returncode == 0
    assert "Traceback" not in log


def test_a_deferred_entry_deleted_before_it_falls_due_is_dropped(appliance: Callable[..., Appliance],
                                                                 world: dict[str, Any], pki: Any,
                                                                 hung_port: int) -> None:
    """An entry scheduled in memory whose envelope an admin deleted is dropped quietly when it falls
    due; an admin's retry of another reaches the running daemon's schedule at once."""
    instance = make_appliance(appliance, world, pki, hung_port)
    spool = OutboundSpool(instance.root / "spool")
    later = 4_000_000_000.0
    gone, retried = write_deferred(spool, 2, due=later)
    instance.start()
    wait_until(lambda: "2 deferred" in instance.log(), what="the schedule rebuilt")
    assert instance.admin("queue", "delete", gone).returncode == 0
    assert instance.admin("queue", "retry", retried).returncode == 0
    wait_until(lambda: "to=<victim1@hung.example>" in instance.log() or
               "relay=127.0.0.1" in instance.log() or spool.state_of(retried) == "active",
               what="the retried entry taken by the daemon")
    assert gone not in spool.queued_ids()
