"""A large message on a slow or hung disk holds back its own 250 only: the
BatchCommitter takes a spilled message once its file is written and fsynced
(``IncomingMessage.finishing``), so no commit thread waits for one message's
disk.  The disk is hung by holding the spill writer on an Event (or by
``StalledDisk``); the reactor is a stand-in that collects the results."""

from __future__ import annotations

import errno
import gc
import os
import random
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError

from mailappliance import maildir
from mailappliance.committer import BatchCommitter
from mailappliance.delivered_to import RecipientCopy
from mailappliance.delivery import Delivery
from mailappliance.maildir import SpillWriter
from mailappliance.metrics import METRICS
from tests.conditions import wait_until
from tests.test_commit import CollectingReactor, new_files
from tests.test_maildir_spill import StalledDisk, assert_nothing_placed

MiB = 1024 * 1024


class HungDisk:
    """The spill writer writes nothing until ``release`` (the hook the daemon's hostile test uses)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.released = threading.Event()
        self.stuck = threading.Event()

        def hang() -> None:
            self.stuck.set()
            self.released.wait(30)

        monkeypatch.setattr(maildir, "_test_stall", "hung")
        monkeypatch.setattr(maildir, "_hung_disk_for_tests", hang)

    def release(self) -> None:
        self.released.set()


@pytest.fixture(autouse=True)
def writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[SpillWriter]:
    """A spill writer of the test's own (its thread ends with the test process)."""
    fresh = SpillWriter()
    monkeypatch.setattr(maildir, "_spill_writer", fresh)
    yield fresh


@pytest.fixture
def committer() -> Iterator[tuple[BatchCommitter, CollectingReactor]]:
    reactor = CollectingReactor()
    committer = BatchCommitter(reactor)
    committer.start()
    yield committer, reactor
    committer.stop()


def staged(incoming: Path, body: bytes) -> Delivery:
    """``body`` received in 64 KiB reads, as a session stages it."""
    incoming.mkdir(exist_ok=True)
    delivery = Delivery(incoming)
    for start in range(0, len(body), 65536):
        delivery.write(body[start:start + 65536])
    return delivery


def results_after(reactor: CollectingReactor, count: int) -> None:
    """Wait for ``count`` reports from the commit threads and fire them (the reactor's turn)."""
    reactor.wait_for(count)
    reactor.run_calls()


def waiting_for_disk() -> float:
    return METRICS.value("mailappliance_commit_waiting_for_disk")


def test_a_small_message_is_committed_while_a_large_one_waits_for_its_hung_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """With the spill writer hung under a 3 MiB message past its final dot, a small message handed over
    after it is committed (the commit thread never waits for the large one); once the disk comes back
    the large one is committed whole."""
    batch, reactor = committer
    disk = HungDisk(monkeypatch)
    incoming, alice, bob = tmp_path / "incoming", tmp_path / "alice", tmp_path / "bob"
    whole = random.Random(1).randbytes(3 * MiB + 777)
    big: list[Any] = []
    staged(incoming, whole).commit(batch.commit, [alice]).addBoth(big.append)
    assert disk.stuck.wait(10)
    assert waiting_for_disk() == 1
    small: list[Any] = []
    staged(incoming, b"Subject: small\r\n\r\nhi\r\n").commit(batch.commit, [bob]).addBoth(small.append)
    results_after(reactor, 1)
    assert len(small) == 1 and isinstance(small[0], list) and small[0][0].read_bytes().endswith(b"hi\r\n")
    assert big == [] and not (alice / "new").exists()  # no 250 before its disk wrote it
    disk.release()
    results_after(reactor, 1)
    assert len(big) == 1 and isinstance(big[0], list)
    assert list(new_files(alice).values()) == [whole]
    assert waiting_for_disk() == 0
    assert list(incoming.iterdir()) == []


def test_a_large_message_whose_disk_fails_gets_a_failure_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """A write error when the stalled disk comes back fails the large message's Deferred with that OSError
    (the session answers 451) and nothing is kept; small messages meanwhile were committed."""
    batch, reactor = committer
    disk = StalledDisk(monkeypatch)
    incoming = tmp_path / "incoming"
    big: list[Any] = []
    staged(incoming, random.Random(2).randbytes(2 * MiB)).commit(batch.commit, [tmp_path / "alice"]).addBoth(big.append)
    wait_until(lambda: disk.calls >= 1, what="the spill writer stuck in its first write")
    small: list[Any] = []
    for n in range(3):
        staged(incoming, b"%d\r\n" % n).commit(batch.commit, [tmp_path / "bob"]).addBoth(small.append)
    wait_until(lambda: sum(len(args[0]) for _, args in reactor.calls) >= 3, what="three small commits")
    reactor.run_calls()
    assert len(small) == 3 and all(isinstance(r, list) for r in small) and big == []
    disk.error = OSError(errno.EIO, "Input/output error")
    disk.go_on.set()
    results_after(reactor, 1)
    assert len(big) == 1 and big[0].check(OSError) and big[0].value.errno == errno.EIO
    assert_nothing_placed(tmp_path)
    assert waiting_for_disk() == 0


def test_stop_waits_for_a_large_message_still_on_its_disk_then_commits_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() still finishes everything handed over: with two commit threads idle and a large message on
    a hung disk, it ends only after the disk came back and that message was committed."""
    disk = HungDisk(monkeypatch)
    reactor = CollectingReactor()
    batch = BatchCommitter(reactor, threads=2)
    batch.start()
    whole = random.Random(3).randbytes(2 * MiB + 5)
    staged(tmp_path / "incoming", whole).commit(batch.commit, [tmp_path / "alice"])
    assert disk.stuck.wait(10)
    stopper = threading.Thread(target=batch.stop, daemon=True)
    stopper.start()
    wait_until(lambda: batch._stopping, what="stop() under way")
    assert stopper.is_alive() and reactor.calls == []
    disk.release()
    stopper.join(20)
    assert not stopper.is_alive(), "stop() did not end once the disk came back"
    assert [len(args[0]) for _, args in reactor.calls] == [1]
    assert list(new_files(tmp_path / "alice").values()) == [whole]


def test_a_spilled_message_for_several_mailboxes_gets_its_copies_written_off_the_commit_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """The recipients' own copies (Delivered-To) of a 2 MiB message are written and fsynced on the sync pool
    before a commit thread takes it (copying a large file there would hold back every other 250); each
    Maildir gets its own Delivered-To, and nothing is left in incoming/."""
    batch, reactor = committer
    writers: list[str] = []
    real_write = RecipientCopy.write

    def recorded(copy: RecipientCopy) -> None:
        writers.append(threading.current_thread().name)
        real_write(copy)

    monkeypatch.setattr(RecipientCopy, "write", recorded)
    incoming, users = tmp_path / "incoming", ("alice", "bob", "carol")
    headers = [b"Delivered-To: %s@example.org\r\n" % u.encode() for u in users]
    body = headers[0] + random.Random(4).randbytes(2 * MiB).hex().encode()[:2 * MiB]
    result: list[Any] = []
    staged(incoming, body).commit(batch.commit, [tmp_path / u for u in users], (), headers,
                                  (0, len(headers[0]))).addBoth(result.append)
    results_after(reactor, 1)
    assert len(result) == 1 and isinstance(result[0], list), result
    assert len(writers) == 2 and all(name.startswith("spill-sync") for name in writers), writers
    for user, header in zip(users, headers, strict=True):
        assert list(new_files(tmp_path / user).values()) == [header + body[len(headers[0]):]]
    assert list(incoming.iterdir()) == []


def test_a_failed_copy_on_the_sync_pool_fails_the_commit_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """A recipient copy that cannot be written (the disk full mid-copy) fails the whole message with that
    OSError (451): no Maildir gets any file, no copy or incoming file is left."""
    batch, reactor = committer
    real_copy = RecipientCopy._copy

    def disk_full(copy: RecipientCopy, source: int, start: int, end: int) -> None:
        real_copy(copy, source, start, min(end, start + 4096))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecipientCopy, "_copy", disk_full)
    incoming, users = tmp_path / "incoming", ("alice", "bob")
    headers = [b"Delivered-To: %s@example.org\r\n" % u.encode() for u in users]
    result: list[Any] = []
    staged(incoming, headers[0] + b"x" * (2 * MiB)).commit(batch.commit, [tmp_path / u for u in users], (), headers,
                                                          (0, len(headers[0]))).addBoth(result.append)
    results_after(reactor, 1)
    assert len(result) == 1 and result[0].check(OSError) and result[0].value.errno == errno.ENOSPC
    for user in users:
        assert not (tmp_path / user / "new").exists() or not list((tmp_path / user / "new").iterdir())
    assert list(incoming.iterdir()) == []


def test_a_client_gone_while_its_message_waits_for_the_disk_frees_it_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: SpillWriter,
        committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """Delivery.abandon (the session ended before its 250) while a 3 MiB message waits for a hung disk:
    its Deferred fails with CancelledError at once, the bytes it held in memory and in the spill writer's
    queue are freed before the disk comes back, and afterwards nothing is stored or left in incoming/."""
    batch, reactor = committer
    disk = HungDisk(monkeypatch)
    incoming, alice = tmp_path / "incoming", tmp_path / "alice"
    delivery = staged(incoming, random.Random(5).randbytes(3 * MiB))
    result: list[Any] = []
    delivery.commit(batch.commit, [alice]).addBoth(result.append)
    assert disk.stuck.wait(10)

    def held() -> int:
        with writer.lock:
            queued = sum(len(c) for m, chunks, _ in writer._jobs if m is delivery.message and chunks for c in chunks)
        return queued + sum(map(len, delivery.message._chunks)) + len(delivery.message._front)

    assert held() > 2 * MiB
    delivery.abandon()
    assert len(result) == 1 and result[0].check(CancelledError)
    assert held() == 0
    disk.release()
    wait_until(lambda: waiting_for_disk() == 0 and not list(incoming.iterdir()), what="the abandoned file removed")
    assert not (alice / "new").exists() or list((alice / "new").iterdir()) == []
    later: list[Any] = []
    staged(incoming, b"after\r\n").commit(batch.commit, [alice]).addBoth(later.append)
    results_after(reactor, 1)
    assert isinstance(later[0], list) and list(new_files(alice).values()) == [b"after\r\n"]


def test_abandon_leaves_a_message_the_commit_already_has_delivered(
        tmp_path: Path, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """Delivery.abandon after the commit took the message (a small one at once, a large one once its
    file was fsynced and claimed) changes nothing: its Deferred still fires with its Maildir paths,
    so the session's accounting (quota, rate limits) sees a delivered message."""
    batch, reactor = committer
    incoming, alice = tmp_path / "incoming", tmp_path / "alice"
    small, large = staged(incoming, b"small\r\n"), staged(incoming, b"L" * (2 * MiB))
    results: list[Any] = []
    small.commit(batch.commit, [alice]).addBoth(results.append)
    small.abandon()
    large.commit(batch.commit, [alice]).addBoth(results.append)
    finishing = large.message.finishing
    assert finishing is not None
    wait_until(lambda: finishing.done() and large.message._claimed, what="the large message claimed")
    large.abandon()
    wait_until(lambda: sum(len(args[0]) for _, args in reactor.calls) >= 2, what="both committed")
    reactor.run_calls()
    assert len(results) == 2 and all(isinstance(r, list) for r in results), results
    assert sorted(map(len, new_files(alice).values())) == [len(b"small\r\n"), 2 * MiB]


def test_a_large_message_is_freed_when_its_commit_is_over_without_the_garbage_collector(
        tmp_path: Path, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """Waiting for its disk leaves no reference cycle (message, its finish future, the job): with the
    cyclic collector off, a committed 2 MiB message is freed as soon as nothing refers to it (a cycle
    kept every large message until the next collection: 12 % more server CPU per 1 MB message)."""
    batch, reactor = committer
    delivery = staged(tmp_path / "incoming", b"F" * (2 * MiB))
    alive = weakref.ref(delivery.message)
    gc.disable()
    try:
        result: list[Any] = []
        delivery.commit(batch.commit, [tmp_path / "alice"]).addBoth(result.append)
        results_after(reactor, 1)
        assert isinstance(result[0], list)
        del delivery, result
        # another large one, so that no thread's last local variable is the first one any more
        staged(tmp_path / "incoming", b"G" * (2 * MiB)).commit(batch.commit, [tmp_path / "alice"])
        results_after(reactor, 1)
        freed = alive() is None  # not inside the assert: pytest would keep the object for its message
        assert freed
    finally:
        gc.enable()


def test_a_large_message_is_committed_while_another_large_ones_fsync_hangs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, committer: tuple[BatchCommitter, CollectingReactor]) -> None:
    """One large message's fsync hangs on the sync pool; a second large message, finished after it, is
    committed meanwhile (the commit thread lingers at most SPILLED_LINGER for the stuck one, never
    waits for it), and the first is committed whole once its fsync returns."""
    batch, reactor = committer
    real_fsync, released, stuck = os.fsync, threading.Event(), threading.Event()
    incoming, alice = tmp_path / "incoming", tmp_path / "alice"
    first = staged(incoming, b"1" * (2 * MiB))

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(first.name):
            stuck.set()
            released.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    results: list[Any] = []
    first.commit(batch.commit, [alice]).addBoth(results.append)
    assert stuck.wait(10)
    second: list[Any] = []
    staged(incoming, b"2" * (2 * MiB)).commit(batch.commit, [alice]).addBoth(second.append)
    results_after(reactor, 1)
    assert len(second) == 1 and isinstance(second[0], list) and results == []
    released.set()
    results_after(reactor, 1)
    assert len(results) == 1 and isinstance(results[0], list)
    assert sorted(new_files(alice).values()) == [b"1" * (2 * MiB), b"2" * (2 * MiB)]
