"""Hostile input meets the trace headers and logs (issue 12, points 3, 11, 12): a fan-out
that would multiply a big message on disk, names from DNS and values from clients that try
to start header fields or log lines of their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.logger import Logger, globalLogPublisher

from mailappliance import delivered_to
from mailappliance.delivered_to import delivered_to_header
from mailappliance.delivery import CommitJob, commit_batch
from mailappliance.logs import event_line
from mailappliance.maildir import IncomingMessage
from mailappliance.trace_headers import received_header


def test_fan_out_copies_are_bounded(tmp_path: Path) -> None:
    """One big message to many mailboxes costs at most the copy budget: the first recipients get
    their own Delivered-To, the rest share one linked copy without it; every mailbox gets the message."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    message = IncomingMessage(incoming)
    message.write(b"Return-Path: <s@example.net>\r\n")
    start = message.size
    message.write(delivered_to_header("u0@example.org"))
    span = (start, message.size)
    body = b"Subject: big\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    message.write(body)
    boxes = [tmp_path / "mail" / f"u{n}" for n in range(12)]
    headers = tuple(delivered_to_header(f"u{n}@example.org") for n in range(12))
    budget = delivered_to.COPY_BUDGET
    delivered_to.COPY_BUDGET = 3 * message.size  # room for three copies of their own
    try:
        [outcome] = commit_batch([CommitJob(message, tuple(boxes), (), headers, span)])
    finally:
        delivered_to.COPY_BUDGET = budget
    assert isinstance(outcome, list) and len(outcome) == 12
    stored = [next((box / "new").iterdir()) for box in boxes]
    own = [p for p in stored if b"\r\nDelivered-To: " in p.read_bytes()[:200]]
    shared = [p for p in stored if p not in own]
    assert len(own) == 4  # the received file's recipient and three copies
    assert all(p.read_bytes().split(b"\r\n")[1] == f"Delivered-To: {p.parent.parent.name}@example.org".encode()
               for p in own)
    assert len({os.stat(p).st_ino for p in shared}) == 1 and len(shared) == 8  # one inode, hard-linked
    assert all(p.read_bytes().endswith(body) for p in stored)
    assert list(incoming.iterdir()) == []


def test_a_hostile_reverse_name_stays_inside_its_comment() -> None:
    """A PTR name with spaces, parentheses or line breaks cannot add a header field or unbalance the comment."""
    header = received_header(helo="x", client_ip="192.0.2.7", hostname="mx.example.org", protocol="ESMTP",
                             message_id="1.M2", recipients=["a@example.org"],
                             client_name="evil (x)\r\nX-Injected: yes")
    assert header.count(b"\r\n") == 3 and b"\r\nX-Injected" not in header
    first = header.split(b"\r\n")[0]
    assert first == b"Received: from x (evil??x???X-Injected:?yes [192.0.2.7])"


def test_a_json_log_line_cannot_be_split_by_a_client() -> None:
    """A client's value with line breaks and quotes stays one JSON line with the value intact."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        Logger(namespace="mailappliance.smtp").info("auth failed: login={login}",
                                                    login='x"}\n{"level":"critical","event":"forged"}')
    finally:
        globalLogPublisher.removeObserver(events.append)
    line = event_line(events[0])
    assert line.count("\n") == 1
    assert json.loads(line)["login"] == 'x"}\n{"level":"critical","event":"forged"}'
