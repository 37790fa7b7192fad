"""A large message's spill to its incoming file by the spill writer thread
(maildir.SpillWriter): reads while pieces are still being written, write
errors that become a failed commit, a refused message's file removed after
its last piece, and the fsync started when the message is handed over."""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from mailappliance import maildir
from mailappliance.delivery import CommitJob, Delivery, commit_batch, journal_targets
from mailappliance.maildir import IncomingMessage, SpillWriter
from tests.conditions import wait_until


class StalledDisk:
    """``os.writev`` and ``os.pwrite`` (O_DIRECT) that wait until the test lets them go on
    (or fail, once told to)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.go_on = threading.Event()
        self.calls = 0
        self.error: OSError | None = None
        real_writev, real_pwrite = os.writev, os.pwrite

        def stalled(real: Any) -> Any:
            def write(*args: Any) -> int:
                self.calls += 1
                self.go_on.wait(30)
                if self.error is not None:
                    raise self.error
                return int(real(*args))
            return write

        monkeypatch.setattr(os, "writev", stalled(real_writev))
        monkeypatch.setattr(os, "pwrite", stalled(real_pwrite))


@pytest.fixture
def writer(monkeypatch: pytest.MonkeyPatch) -> Iterator[SpillWriter]:
    """A spill writer of the test's own (its thread ends with the test process)."""
    fresh = SpillWriter()
    monkeypatch.setattr(maildir, "_spill_writer", fresh)
    yield fresh


def spilled_message(incoming: Path, rng: random.Random, size: int) -> tuple[IncomingMessage, bytes]:
    incoming.mkdir(exist_ok=True)
    message, sent = IncomingMessage(incoming), list[bytes]()
    while sum(map(len, sent)) < size:
        chunk = rng.randbytes(rng.randrange(1, 70_000))
        message.write(chunk)
        sent.append(chunk)
    return message, b"".join(sent)


def assert_nothing_placed(root: Path) -> None:
    """A failed commit left no file in alice's new/ and nothing in incoming/."""
    new = root / "alice" / "new"
    assert not new.exists() or not list(new.iterdir()), "a failed commit placed a file"
    assert list((root / "incoming").iterdir()) == [], "a failed commit left its incoming file"


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])

def test_reads_while_pieces_are_in_flight_give_the_bytes_received(
        tmp_path: Path, writer: SpillWriter, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """Any range of a spilled message reads back as received, whether its bytes are
    in the file, carried short of a whole block, handed to the writer or not handed
    over yet; with O_DIRECT and without."""
    monkeypatch.setattr(maildir, "DIRECT_IO", direct)
    disk = StalledDisk(monkeypatch)
    rng = random.Random(15)
    message, whole = spilled_message(tmp_path / "incoming", rng, 3 * maildir.MEMORY_LIMIT)
    assert message.spilled
    wait_until(lambda: disk.calls >= 1, what="the writer's first writev")
    ranges = [(0, None), (0, 100), (maildir.MEMORY_LIMIT - 10, 40), (len(whole) - 5, 100)]
    ranges += [(rng.randrange(len(whole)), rng.randrange(1, 300_000)) for _ in range(30)]
    for start, limit in ranges:  # nothing written yet: all from memory
        assert message.read(start, limit) == whole[start:None if limit is None else start + limit]
    disk.go_on.set()
    for start, limit in ranges:  # partly written meanwhile, then all
        assert message.read(start, limit) == whole[start:None if limit is None else start + limit]
    writer.wait_for(message)
    for start, limit in ranges:
        assert message.read(start, limit) == whole[start:None if limit is None else start + limit]
    [outcome] = commit_batch([CommitJob(message, (tmp_path / "alice",))])
    assert isinstance(outcome, list)
    assert outcome[0].read_bytes() == whole


def test_a_write_error_fails_the_commit_and_leaves_nothing(
        tmp_path: Path, writer: SpillWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under the spill writer: the commit fails with that error (a 4xx for
    the client), no Maildir file appears and incoming/ is left empty."""
    disk = StalledDisk(monkeypatch)
    disk.error = OSError(errno.ENOSPC, "No space left on device")
    disk.go_on.set()
    message, _ = spilled_message(tmp_path / "incoming", random.Random(1), 2 * maildir.MEMORY_LIMIT)
    [outcome] = commit_batch([CommitJob(message, (tmp_path / "alice",))])
    assert isinstance(outcome, OSError) and outcome.errno == errno.ENOSPC
    assert_nothing_placed(tmp_path)


def test_a_refused_message_is_removed_after_its_last_piece(
        tmp_path: Path, writer: SpillWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    """Discarding a message whose pieces are still being written: the writer finishes
    with the file it has open (skipping what is left) and then removes it."""
    disk = StalledDisk(monkeypatch)
    message, _ = spilled_message(tmp_path / "incoming", random.Random(2), 3 * maildir.MEMORY_LIMIT)
    wait_until(lambda: disk.calls >= 1, what="the writer's first writev")
    message.discard()
    message.discard()  # twice (an abort after a failed commit): harmless
    disk.go_on.set()
    writer.wait_for(message)
    wait_until(lambda: not list((tmp_path / "incoming").iterdir()), what="incoming/ empty")
    assert disk.calls == 1  # the pieces after the first were never written


def handed_over(tmp_path: Path, whole: bytes) -> CommitJob:
    """``whole`` received in 64 KiB reads by a staged Delivery in ``tmp_path/incoming``
    and handed to a commit for alice (one that only records the job)."""
    jobs: list[CommitJob] = []

    def committer(job: CommitJob) -> Deferred[list[Path]]:
        jobs.append(job)
        return Deferred()

    (tmp_path / "incoming").mkdir()
    staged = Delivery(tmp_path / "incoming")
    for start in range(0, len(whole), 65536):
        staged.write(whole[start:start + 65536])
    staged.commit(committer, [tmp_path / "alice"])
    [job] = jobs
    return job


def test_a_handed_over_message_is_finished_and_synced_before_the_commit_thread_runs(tmp_path: Path) -> None:
    """Delivery.commit starts a spilled message's last write and fsync on the sync pool at
    once; the commit (here: later) finds it durable and places it whole."""
    whole = random.Random(3).randbytes(2 * maildir.MEMORY_LIMIT + 12345)
    job = handed_over(tmp_path, whole)
    wait_until(lambda: job.message._synced, what="the sync pool's fsync")
    [outcome] = commit_batch([job])
    assert isinstance(outcome, list) and outcome[0].read_bytes() == whole
    assert list((tmp_path / "incoming").iterdir()) == []


def test_a_failed_fsync_on_the_sync_pool_fails_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync error while finishing early is the commit's outcome: nothing placed."""
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    message, _ = spilled_message(tmp_path / "incoming", random.Random(4), 2 * maildir.MEMORY_LIMIT)
    message.finish_early()
    [outcome] = commit_batch([CommitJob(message, (tmp_path / "alice",))])
    assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
    assert_nothing_placed(tmp_path)


def test_a_filesystem_without_o_direct_gets_buffered_writes(
        tmp_path: Path, writer: SpillWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses to open with O_DIRECT (EINVAL, as tmpfs did before Linux
    6.6): the spilled file is written through the page cache, whole."""
    real_open = os.open

    def no_direct_open(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    message, whole = spilled_message(tmp_path / "incoming", random.Random(5), 2 * maildir.MEMORY_LIMIT)
    writer.wait_for(message)
    assert message._created and not message._direct
    [outcome] = commit_batch([CommitJob(message, (tmp_path / "alice",))])
    assert isinstance(outcome, list) and outcome[0].read_bytes() == whole


def test_o_direct_refused_at_the_first_write_falls_back(
        tmp_path: Path, writer: SpillWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that opens with O_DIRECT but refuses the write (EINVAL): the message
    is written through the page cache instead, whole."""
    def refusing_pwrite(*args: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    message, whole = spilled_message(tmp_path / "incoming", random.Random(6), 3 * maildir.MEMORY_LIMIT)
    writer.wait_for(message)
    assert message._error is None and not message._direct
    [outcome] = commit_batch([CommitJob(message, (tmp_path / "alice",))])
    assert isinstance(outcome, list) and outcome[0].read_bytes() == whole


@pytest.mark.parametrize("size", [maildir.DIRECT_LIMIT - 1000, maildir.DIRECT_LIMIT + 1000])
def test_a_message_past_the_direct_limit_is_written_directly_not_journaled(tmp_path: Path, size: int) -> None:
    """Handed to the commit, a message in memory above DIRECT_LIMIT goes the spilled way (O_DIRECT,
    its own fsync: the journal would write it twice); a smaller one stays in memory for the journal."""
    whole = random.Random(7).randbytes(size)
    job = handed_over(tmp_path, whole)
    assert job.message.spilled == (size > maildir.DIRECT_LIMIT)
    assert journal_targets(job, tmp_path) is None if job.message.spilled else journal_targets(job, tmp_path)
    [outcome] = commit_batch([job])
    assert isinstance(outcome, list) and outcome[0].read_bytes() == whole
    assert list((tmp_path / "incoming").iterdir()) == []
