"""Large messages against a disk that does not keep up: what the spill writer
holds in memory is bounded for the whole process, and nothing waits for the
disk in the reactor thread.

An attacker (or many honest senders) streaming big messages faster than the
disk takes them must not make the reactor queue the bytes without end: past
the spill writer's backlog a message keeps its next piece and its session
stops reading (tests/test_spill_backpressure.py, and the daemon-level
tests/hostile/test_spill_stall.py), while the reactor goes on serving others.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailappliance import maildir
from mailappliance.maildir import IncomingMessage, SpillWriter
from tests.conditions import wait_until


def test_queued_bytes_stay_under_the_backlog_while_the_disk_stalls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four messages of 4 MiB each against a stalled disk and a 2 MiB backlog: the writing
    (reactor) thread never waits, the queue never holds more than the backlog, the messages
    past it keep their bytes in order; once the disk goes on and the reactor's calls run, every file
    is whole."""
    backlog = 2 * 1024 * 1024
    calls: list[Any] = []
    writer = SpillWriter(backlog=backlog, call_from_thread=calls.append)
    monkeypatch.setattr(maildir, "_spill_writer", writer)
    go_on = threading.Event()
    peak = [0]

    def stalled(real: Any) -> Any:
        def write(*args: Any) -> int:
            peak[0] = max(peak[0], writer._queued)
            go_on.wait(30)
            return int(real(*args))
        return write

    monkeypatch.setattr(os, "writev", stalled(os.writev))
    monkeypatch.setattr(os, "pwrite", stalled(os.pwrite))  # O_DIRECT writes
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    messages = [IncomingMessage(incoming) for _ in range(4)]
    chunk = b"x" * 998 + b"\r\n"
    started = time.monotonic()
    for message in messages:  # the reactor's part: every message written in turn
        for _ in range(4 * 1024 * 1024 // len(chunk)):
            message.write(chunk)
            peak[0] = max(peak[0], writer._queued)
    assert time.monotonic() - started < 5, "a write waited for the stalled disk"
    assert writer._queued <= backlog and writer.waiting == 4
    assert peak[0] <= backlog
    go_on.set()  # (then a waiting message goes to an empty queue whole: here it held all it was given)

    def drained() -> bool:
        while calls:
            calls.pop(0)()
        return not writer.waiting and not writer._queued

    wait_until(drained, what="the writer taking every waiting piece")
    for message in messages:
        writer.wait_for(message)
        assert message._error is None
        assert message._written + len(message._unwritten) + sum(map(len, message._chunks)) == message.size
        assert os.path.getsize(message.path) == message._written
        message.discard()


def test_a_complete_message_is_handed_over_past_a_full_backlog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that is complete (handed to the commit) and over DIRECT_LIMIT goes to the spill
    writer without waiting for a full backlog: its bytes are in memory either way, and waiting
    would stall the reactor behind the disk."""
    writer = SpillWriter(backlog=maildir.MEMORY_LIMIT)
    monkeypatch.setattr(maildir, "_spill_writer", writer)
    go_on = threading.Event()
    real = os.pwrite

    def stalled(*args: Any) -> int:
        go_on.wait(30)
        return int(real(*args))

    monkeypatch.setattr(os, "pwrite", stalled)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    first = IncomingMessage(incoming)
    first.write(b"x" * (maildir.MEMORY_LIMIT + 1))  # spilled: the backlog is full
    complete = IncomingMessage(incoming)
    complete.write(b"y" * (maildir.DIRECT_LIMIT + 1))
    handed = threading.Thread(target=complete.finish_early, daemon=True)
    handed.start()
    handed.join(10)
    assert not handed.is_alive() and complete.spilled
    go_on.set()
    complete.write_out()
    complete.sync()
    first.discard()
    complete.discard()
