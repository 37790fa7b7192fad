"""Spill backpressure: a full spill backlog (maildir.SpillWriter) pauses only the
session whose large message would pass it, never the reactor thread.  The disk
is stalled by holding the spill writer's writes on an Event; the writer's calls
into the reactor thread are collected and run by the test, so every step is
deterministic."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailappliance import maildir
from mailappliance.maildir import IncomingMessage, SpillWriter
from tests.conditions import wait_until
from tests.test_maildir_spill import StalledDisk
from tests.test_smtp_protocol import Harness

MiB = 1024 * 1024
BACKLOG = 2 * MiB
READ = 65536  # one TCP read's worth


class ReactorCalls:
    """The writer's ``call_from_thread``: what it asks of the reactor thread, run when the test says."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def __call__(self, call: Callable[[], None]) -> None:
        with self.lock:
            self.calls.append(call)

    def run(self) -> int:
        with self.lock:
            calls, self.calls = self.calls, []
        for call in calls:
            call()
        return len(calls)


@pytest.fixture
def reactor_calls() -> ReactorCalls:
    return ReactorCalls()


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch, reactor_calls: ReactorCalls) -> Iterator[SpillWriter]:
    """A spill writer of the test's own with a 2 MiB backlog."""
    fresh = SpillWriter(backlog=BACKLOG, call_from_thread=reactor_calls)
    monkeypatch.setattr(maildir, "_spill_writer", fresh)
    yield fresh


def drain(writer: SpillWriter, reactor_calls: ReactorCalls, until: Callable[[], bool]) -> None:
    """Run the writer's calls into the reactor thread until ``until`` holds."""
    def step() -> bool:
        reactor_calls.run()
        return until()
    wait_until(step, timeout=20, what="the spill writer draining")


def lines(rng: random.Random, size: int) -> bytes:
    """``size`` octets of CRLF-ended text lines that differ (so a reordering shows)."""
    out, total = [], 0
    while total < size:
        line = b"%08d " % total + rng.randbytes(30).hex().encode() + b"\r\n"
        out.append(line)
        total += len(line)
    return b"".join(out)


MAIL = b"EHLO big.example.net\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"


def big_session(tmp_path: Path, name: str) -> Harness:
    (tmp_path / name).mkdir()
    h = Harness(tmp_path / name, max_size=16 * MiB)
    assert h.codes(MAIL)[-1] == 354
    return h


def feed_until_paused(h: Harness, body: bytes) -> int:
    """Send ``body`` in 64 KiB reads until the session stops reading; how much was sent."""
    sent = 0
    while sent < len(body) and h.transport.producerState != "paused":
        started = time.monotonic()
        h.send(body[sent:sent + READ])
        assert time.monotonic() - started < 1, "dataReceived waited (for the disk?) in the reactor thread"
        sent += READ
    assert h.transport.producerState == "paused", "the backlog never filled"
    return sent


def feed(h: Harness, writer: SpillWriter, reactor_calls: ReactorCalls, data: bytes) -> None:
    """Send ``data`` in 64 KiB reads, each once the session reads again (as TCP would)."""
    for start in range(0, len(data), READ):
        drain(writer, reactor_calls, lambda: h.transport.producerState == "producing")
        h.protocol.dataReceived(data[start:start + READ])
    drain(writer, reactor_calls, lambda: h.transport.producerState == "producing")


def test_writes_past_a_full_backlog_return_at_once_and_keep_their_bytes(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a stalled disk, writing 3 x 3 MiB never waits: the queue stays within the backlog, the
    messages past it hold their bytes (held_back) in arrival order, and once the disk goes on every
    one is handed over, told (when_room), and written whole and in order."""
    disk = StalledDisk(monkeypatch)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rng = random.Random(1)
    messages = [IncomingMessage(incoming) for _ in range(3)]
    bodies = [lines(rng, 3 * MiB) for _ in messages]
    told: list[int] = []
    started = time.monotonic()
    for n, (message, body) in enumerate(zip(messages, bodies, strict=True)):
        for start in range(0, len(body), READ):
            message.write(body[start:start + READ])
            assert writer._queued <= BACKLOG
        if message.held_back:
            message.when_room(lambda n=n: told.append(n))
    assert time.monotonic() - started < 5, "a write waited for the stalled disk"
    assert [m.held_back for m in messages] == [True, True, True]  # the first spilled 1 MiB, then filled up
    assert [m.held_back for m in writer._waiting] == [True] * 3 and list(writer._waiting) == messages
    for message, body in zip(messages, bodies, strict=True):
        assert message.read() == body  # what is held back reads back in place
    disk.go_on.set()
    drain(writer, reactor_calls, lambda: not writer.waiting)
    assert told == [0, 1, 2]  # first come, first handed over
    for message, body in zip(messages, bodies, strict=True):
        message.write_out()
        message.sync()
        assert message.path.read_bytes() == body
        message.discard()


def test_the_over_the_bound_session_is_paused_and_resumed_in_order_while_another_is_served(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6 MiB DATA against a stalled disk: once the backlog is full that session's transport is paused
    (its later bytes wait in its input), another session's whole transaction is answered meanwhile;
    after the disk drains below the low-water mark the first is resumed, gets its 250, and its message
    is stored byte for byte in order."""
    disk = StalledDisk(monkeypatch)
    big = big_session(tmp_path, "big")
    body = lines(random.Random(2), 6 * MiB)
    sent = feed_until_paused(big, body)
    assert big.protocol.delivery.message.held_back and writer.waiting == 1
    assert not big.send(body[sent:sent + READ])  # a read already under way: kept in order, not consumed
    sent += READ
    assert len(big.protocol.input) == READ

    (tmp_path / "other").mkdir()
    other = Harness(tmp_path / "other")  # another connection (its own transport)
    codes = other.codes(b"EHLO small.example\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<bob@example.org>\r\n"
                        b"DATA\r\nSubject: small\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert codes == [250, 250, 250, 354, 250, 221]
    assert len(other.messages("bob")) == 1

    disk.go_on.set()
    drain(writer, reactor_calls, lambda: big.transport.producerState == "producing")
    assert not big.protocol.delivery.message.held_back and not big.protocol.input
    big.transport.clear()
    feed(big, writer, reactor_calls, body[sent:] + b".\r\n")
    assert big.transport.value().decode().splitlines()[-1].startswith("250 2.0.0 Ok: queued as ")
    [stored] = big.messages("alice")
    assert stored.endswith(b"\r\n" + body)


def test_a_disconnect_while_paused_frees_the_bytes_and_the_place(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paused session's client goes away: it leaves the writer's waiting line (the next one
    moves up), its held-back bytes are dropped, its file is removed once the disk goes on, and it
    is never resumed."""
    disk = StalledDisk(monkeypatch)
    first = big_session(tmp_path, "first")
    second = big_session(tmp_path, "second")
    body = lines(random.Random(3), 4 * MiB)
    feed_until_paused(first, body)
    feed_until_paused(second, body)
    gone = first.protocol.delivery.message
    assert list(writer._waiting) == [gone, second.protocol.delivery.message]
    first.protocol.connectionLost(None)
    assert list(writer._waiting) == [second.protocol.delivery.message]
    assert not gone.held_back and gone._chunks == [] and gone._on_room is None
    disk.go_on.set()
    drain(writer, reactor_calls, lambda: second.transport.producerState == "producing")
    second.protocol.connectionLost(None)
    drain(writer, reactor_calls, lambda: not writer._queued)
    wait_until(lambda: not list((tmp_path / "first" / "incoming").iterdir()), what="the file removed")
    wait_until(lambda: not list((tmp_path / "second" / "incoming").iterdir()), what="the file removed")


def test_a_disk_that_never_drains_ends_the_paused_session_at_its_idle_timeout(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung disk does not keep the connection forever: the idle timeout answers 421 and closes;
    nothing got a 250, nothing is stored, and the message leaves the waiting line."""
    disk = StalledDisk(monkeypatch)
    big = big_session(tmp_path, "big")
    feed_until_paused(big, lines(random.Random(4), 4 * MiB))
    big.transport.clear()
    big.clock.advance(big.config.idle_timeout + 1)
    assert big.transport.value().startswith(b"421 4.4.2 ") and big.transport.disconnecting
    big.protocol.connectionLost(None)
    assert not writer.waiting and not big.messages("alice")
    disk.go_on.set()  # the writer thread, stuck in the test's disk, may end


def test_bdat_chunks_pause_the_same_way(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5 MiB BDAT chunk against a stalled disk pauses its session; after the drain it is stored whole."""
    disk = StalledDisk(monkeypatch)
    (tmp_path / "b").mkdir()
    h = Harness(tmp_path / "b", max_size=16 * MiB)
    body = lines(random.Random(5), 5 * MiB)
    h.send(b"EHLO c\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
    h.send(b"BDAT %d LAST\r\n" % len(body))
    sent = feed_until_paused(h, body)
    disk.go_on.set()
    feed(h, writer, reactor_calls, body[sent:])
    assert h.transport.value().decode().splitlines()[-1].startswith("250 2.0.0 Ok: queued as ")
    [stored] = h.messages("alice")
    assert stored.endswith(b"\r\n" + body)


def test_the_writer_asks_the_reactor_only_when_drained_to_the_low_water_mark(
        tmp_path: Path, writer: SpillWriter, reactor_calls: ReactorCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """No polling: while messages wait, the writer calls into the reactor thread once the backlog is
    at or below the low-water mark, and not again until that call has run."""
    seen: list[int] = []
    real = writer._wake

    def wake() -> None:
        seen.append(writer._queued)
        real()

    monkeypatch.setattr(writer, "_wake", wake)
    disk = StalledDisk(monkeypatch)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    message = IncomingMessage(incoming)
    body = lines(random.Random(6), 3 * MiB)
    for start in range(0, len(body), READ):
        message.write(body[start:start + READ])
    assert message.held_back and not seen
    disk.go_on.set()
    wait_until(lambda: seen, what="the writer's call")
    assert len(seen) == 1 and seen[0] <= writer.low_water
    drain(writer, reactor_calls, lambda: not writer.waiting)
    message.discard()
